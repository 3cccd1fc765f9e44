"""Block manager: lazy allocation, reference counts, prefix cache, LRU eviction, copy-on-write, metrics."""

import numpy as np
import pytest

from jaxinfer.sampling_params import SamplingParams
from jaxinfer.scheduler import NULL_BLOCK, BlockManager, Sequence

BLOCK_SIZE = 4


def make_seq(token_ids, seq_index=0) -> Sequence:
    return Sequence("r", seq_index, list(token_ids), SamplingParams(), 0, 0.0, 0)


def compute(bm: BlockManager, seq: Sequence, num_new_tokens: int) -> list:
    """Allocates slots for the next tokens and marks them computed, as one engine step would."""
    before = seq.num_computed_tokens
    copies = bm.allocate_slots(seq, num_new_tokens)
    assert copies is not None
    seq.num_computed_tokens += num_new_tokens
    bm.cache_computed_blocks(seq, before)
    return copies


def prefill(bm: BlockManager, seq: Sequence) -> None:
    """Admits a sequence with its cached prefix and computes the rest of its tokens."""
    cached = bm.find_cached_prefix(seq)
    assert bm.admit(seq, cached, 0)
    compute(bm, seq, seq.num_tokens - seq.num_computed_tokens)


def random_tokens(rng, n):
    return rng.integers(1, 1000, size=n).tolist()


def test_lazy_allocation_and_free_return_every_block():
    rng = np.random.default_rng(0)
    bm = BlockManager(num_blocks=9, block_size=BLOCK_SIZE)
    seq = make_seq(random_tokens(rng, 10))
    assert bm.admit(seq, [], 6)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 6
    seq.num_computed_tokens = 6
    assert bm.allocate_slots(seq, 4) == []
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    assert NULL_BLOCK not in seq.block_table
    bm.free(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 8
    assert all(bm.ref_count(b) == 0 for b in range(9))


def test_null_block_never_handed_out_and_failed_allocation_changes_nothing():
    rng = np.random.default_rng(1)
    bm = BlockManager(num_blocks=6, block_size=BLOCK_SIZE)
    seq = make_seq(random_tokens(rng, 5 * BLOCK_SIZE))
    assert bm.admit(seq, [], 5 * BLOCK_SIZE)
    assert sorted(seq.block_table) == [1, 2, 3, 4, 5]
    other = make_seq(random_tokens(rng, 3))
    assert not bm.admit(other, [], 3)
    assert other.block_table == [] and other.num_computed_tokens == 0
    seq.num_computed_tokens = 5 * BLOCK_SIZE
    assert bm.allocate_slots(seq, 1) is None
    assert len(seq.block_table) == 5


def test_prefix_hit_shares_physical_blocks_and_counts_tokens():
    rng = np.random.default_rng(2)
    bm = BlockManager(num_blocks=16, block_size=BLOCK_SIZE)
    system = random_tokens(rng, 2 * BLOCK_SIZE)
    first = make_seq(system + random_tokens(rng, 3))
    prefill(bm, first)
    second = make_seq(system + random_tokens(rng, 6))
    cached = bm.find_cached_prefix(second)
    assert cached == first.block_table[:2]
    assert bm.admit(second, cached, second.num_tokens - 2 * BLOCK_SIZE)
    assert second.num_computed_tokens == 2 * BLOCK_SIZE
    assert [bm.ref_count(b) for b in cached] == [2, 2]
    metrics = bm.metrics()
    assert metrics.prefix_cache_queries == first.num_tokens + second.num_tokens
    assert metrics.prefix_cache_hits == 2 * BLOCK_SIZE


def test_prefix_lookup_leaves_the_last_token_to_compute():
    rng = np.random.default_rng(3)
    bm = BlockManager(num_blocks=16, block_size=BLOCK_SIZE)
    prompt = random_tokens(rng, 3 * BLOCK_SIZE)
    first = make_seq(prompt)
    prefill(bm, first)
    assert len(bm.find_cached_prefix(make_seq(prompt))) == 2
    assert len(bm.find_cached_prefix(make_seq(prompt + [7]))) == 3


def test_hash_chain_needs_the_whole_prefix_to_match():
    rng = np.random.default_rng(4)
    bm = BlockManager(num_blocks=16, block_size=BLOCK_SIZE)
    head, other_head, shared_block = (random_tokens(rng, BLOCK_SIZE) for _ in range(3))
    first = make_seq(head + shared_block + [5])
    prefill(bm, first)
    assert bm.find_cached_prefix(make_seq(other_head + shared_block + [5])) == []
    # Equal tokens after a different prefix have other K/V: that block must not be reused.
    second = make_seq(other_head + shared_block + [6])
    prefill(bm, second)
    assert bm.find_cached_prefix(make_seq(other_head + shared_block + [7])) == second.block_table[:2]


def test_evictable_blocks_are_reused_last_and_least_recently_used_first():
    rng = np.random.default_rng(5)
    bm = BlockManager(num_blocks=7, block_size=BLOCK_SIZE)
    old = make_seq(random_tokens(rng, 2 * BLOCK_SIZE + 1))
    prefill(bm, old)
    recent = make_seq(random_tokens(rng, 2 * BLOCK_SIZE + 1))
    prefill(bm, recent)
    old_full, recent_full = old.block_table[:2], recent.block_table[:2]
    bm.free(old)
    bm.free(recent)
    assert bm.metrics().num_cached_blocks == 4 and bm.num_free_blocks == 6
    # Two never-hashed free blocks go out before any cached one is evicted.
    taker = make_seq(random_tokens(rng, 2 * BLOCK_SIZE))
    assert bm.admit(taker, [], 2 * BLOCK_SIZE)
    assert bm.find_cached_prefix(make_seq(old.token_ids)) == old_full
    # The next fresh block evicts the least recently freed chain's tail block first.
    grower = make_seq(random_tokens(rng, BLOCK_SIZE))
    assert bm.admit(grower, [], BLOCK_SIZE)
    assert grower.block_table == [old_full[1]]
    assert bm.find_cached_prefix(make_seq(old.token_ids)) == old_full[:1]
    assert bm.find_cached_prefix(make_seq(recent.token_ids)) == recent_full


def test_copy_on_write_after_fork():
    rng = np.random.default_rng(6)
    bm = BlockManager(num_blocks=16, block_size=BLOCK_SIZE)
    parent = make_seq(random_tokens(rng, 2 * BLOCK_SIZE + 2))
    prefill(bm, parent)
    children = [parent.fork(i) for i in (1, 2)]
    for child in children:
        bm.fork(parent, child)
    assert [bm.ref_count(b) for b in parent.block_table] == [3, 3, 3]
    shared_tail = parent.block_table[2]
    for seq in (parent, children[0]):
        seq.append_token(rng.integers(1, 1000))
    copies = [compute(bm, seq, 1) for seq in (parent, children[0])]
    assert copies[0] == [(shared_tail, parent.block_table[2])]
    assert copies[1] == [(shared_tail, children[0].block_table[2])]
    assert parent.block_table[2] != children[0].block_table[2]
    assert parent.block_table[:2] == children[0].block_table[:2] == children[1].block_table[:2]
    # The last holder of the shared block writes in place.
    children[1].append_token(rng.integers(1, 1000))
    assert compute(bm, children[1], 1) == []
    assert children[1].block_table[2] == shared_tail and bm.ref_count(shared_tail) == 1


def test_fork_on_block_boundary_needs_no_copy():
    rng = np.random.default_rng(7)
    bm = BlockManager(num_blocks=16, block_size=BLOCK_SIZE)
    parent = make_seq(random_tokens(rng, 2 * BLOCK_SIZE))
    prefill(bm, parent)
    child = parent.fork(1)
    bm.fork(parent, child)
    for seq in (parent, child):
        seq.append_token(rng.integers(1, 1000))
        assert compute(bm, seq, 1) == []
    assert parent.block_table[2] != child.block_table[2]


def test_unfilled_slots_match_an_oracle_over_random_operations():
    rng = np.random.default_rng(8)
    bm = BlockManager(num_blocks=40, block_size=BLOCK_SIZE)
    live = []
    for _ in range(300):
        action = rng.integers(4)
        if action == 0 or not live:
            seq = make_seq(random_tokens(rng, int(rng.integers(1, 12))))
            cached = bm.find_cached_prefix(seq)
            if bm.admit(seq, cached, seq.num_tokens - len(cached) * BLOCK_SIZE):
                seq.num_computed_tokens = seq.num_tokens
                bm.cache_computed_blocks(seq, len(cached) * BLOCK_SIZE)
                live.append(seq)
        elif action == 1:
            bm.free(live.pop(int(rng.integers(len(live)))))
        elif action == 2:
            parent = live[int(rng.integers(len(live)))]
            child = parent.fork(1)
            bm.fork(parent, child)
            live.append(child)
        else:
            seq = live[int(rng.integers(len(live)))]
            seq.append_token(rng.integers(1, 1000))
            if bm.allocate_slots(seq, 1) is not None:
                seq.num_computed_tokens += 1
            else:
                seq.token_ids.pop()
        held = {}
        for seq in live:
            for i, block in enumerate(seq.block_table):
                held[block] = max(held.get(block, 0), min(BLOCK_SIZE, seq.num_computed_tokens - i * BLOCK_SIZE))
        metrics = bm.metrics()
        assert metrics.num_used_blocks == len(held)
        assert metrics.num_unfilled_slots == sum(BLOCK_SIZE - n for n in held.values())
        for block, expected in _ref_counts(live).items():
            assert bm.ref_count(block) == expected
    for seq in live:
        bm.free(seq)
    assert bm.metrics().num_used_blocks == 0 and bm.metrics().num_unfilled_slots == 0


def _ref_counts(seqs):
    counts = {}
    for seq in seqs:
        for block in seq.block_table:
            counts[block] = counts.get(block, 0) + 1
    return counts


def test_bad_pool_shapes_are_rejected():
    with pytest.raises(ValueError, match="null block"):
        BlockManager(num_blocks=1, block_size=4)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(num_blocks=8, block_size=0)
