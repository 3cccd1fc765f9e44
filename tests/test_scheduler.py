"""Scheduler: budgets, decode-first chunked prefill, preemption, prefix sharing, forks, aborts.

The oracle is a simulated device pool: a numpy array holding, in each KV slot, what a real K/V
entry depends on, the fingerprint of the whole prefix up to and including that token. A fake runner
performs the step's block copies, writes every scheduled token's fingerprint into its slot and
checks that each scheduled sequence reads back exactly its own prefix through its block table;
after every step, every running sequence's computed context must still be intact. A wrong prefix
hit (even one with equal tokens after a different prefix), a missing or misdirected copy-on-write,
or a block reused while still referenced shows up as a mismatch.
"""

import dataclasses

import numpy as np
import pytest

from jaxinfer.errors import RequestError
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.scheduler import NULL_BLOCK, BlockManager, Scheduler, Sequence, SequenceStatus

BLOCK_SIZE = 4
EOS = 1
VOCAB = 40


def prefix_fingerprints(token_ids) -> list[int]:
    """Entry p identifies token_ids[:p + 1] (a polynomial hash modulo a Mersenne prime)."""
    fingerprints, value = [], 0
    for token in token_ids:
        value = (value * 1_000_003 + token + 1) % (2**61 - 1)
        fingerprints.append(value)
    return fingerprints


class FakeRunner:
    """Stands in for the model runner: prefix fingerprints per KV slot and a random sampler."""

    def __init__(self, num_blocks: int, rng):
        self.pool = np.full((num_blocks, BLOCK_SIZE), -1, dtype=np.int64)
        self.rng = rng

    def run(self, output) -> list:
        if output.block_copies:
            src, dst = np.array(output.block_copies).T
            assert len(set(dst)) == len(dst)
            self.pool[dst] = self.pool[src]
        written = set()
        for entry in output.scheduled:
            assert NULL_BLOCK not in entry.block_table
            end = entry.start_position + entry.num_new_tokens
            assert entry.token_ids == entry.seq.token_ids[entry.start_position:end]
            fingerprints = prefix_fingerprints(entry.seq.token_ids[:end])
            for position in range(entry.start_position, end):
                slot = (entry.block_table[position // BLOCK_SIZE], position % BLOCK_SIZE)
                assert slot not in written, "two tokens of one step write the same KV slot"
                written.add(slot)
                self.pool[slot] = fingerprints[position]
        for entry in output.scheduled:
            self.check_context(entry.seq, entry.block_table, entry.start_position + entry.num_new_tokens)
        return [self.sample(entry.num_samples) for entry in output.scheduled]

    def check_context(self, seq, block_table, num_tokens) -> None:
        """The first `num_tokens` slots of `block_table` hold exactly `seq`'s prefix."""
        held = [int(self.pool[block_table[p // BLOCK_SIZE], p % BLOCK_SIZE]) for p in range(num_tokens)]
        assert held == prefix_fingerprints(seq.token_ids[:num_tokens]), f"KV content of {seq!r} is corrupted"

    def sample(self, num_samples):
        tokens = self.rng.integers(EOS, VOCAB, size=num_samples).tolist()
        return tokens[0] if num_samples == 1 else tokens


def make_scheduler(num_blocks=64, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=64,
                   enable_chunked_prefill=True, decode_steps=1, decode_call_tokens=1):
    return Scheduler(BlockManager(num_blocks, BLOCK_SIZE), max_num_seqs, max_num_batched_tokens,
                     max_model_len, enable_chunked_prefill=enable_chunked_prefill, eos_token_ids=(EOS,),
                     decode_steps=decode_steps, decode_call_tokens=decode_call_tokens)


def setup(seed, **scheduler_kwargs):
    """A seeded generator, a scheduler and a fake runner over the same pool."""
    rng = np.random.default_rng(seed)
    scheduler = make_scheduler(**scheduler_kwargs)
    return rng, scheduler, FakeRunner(scheduler.block_manager.num_blocks, rng)


def random_prompt(rng, num_tokens):
    return rng.integers(2, VOCAB, size=num_tokens).tolist()


def step(scheduler, runner):
    output = scheduler.schedule()
    return output, scheduler.update(output, runner.run(output))


def run_model_steps(scheduler, runner, output, rng) -> list:
    """Runs a call's model steps one after the other, as the engine records them (only sequences
    still running write K/V: a stopped one's later tokens are dropped), with an abort in flight now
    and then; returns the sequences that changed."""
    changed = []
    for index in range(output.num_steps):
        step_output = output.model_step(index)
        running = dataclasses.replace(step_output, scheduled=tuple(
            e for e in step_output.scheduled if e.seq.status is SequenceStatus.RUNNING))
        by_seq = dict(zip((e.seq.seq_id for e in running.scheduled), runner.run(running)))
        sampled = {e.seq.seq_id: by_seq.get(e.seq.seq_id, EOS) for e in step_output.scheduled}
        if running.scheduled and rng.random() < 0.05:
            scheduler.abort(running.scheduled[rng.integers(len(running.scheduled))].seq.request_id)
        changed += scheduler.update(step_output, list(sampled.values()) if rng.random() < 0.5 else sampled)
    return changed


def check_model_steps(scheduler, output):
    """A call of several model steps only decodes, within its bounds, and has slots for every step."""
    if output.num_steps == 1:
        return
    assert 1 < output.num_steps <= scheduler.decode_steps
    assert output.num_steps * len(output.scheduled) <= scheduler.decode_call_tokens
    for entry in output.scheduled:
        seq, params = entry.seq, entry.seq.sampling_params
        assert entry.num_new_tokens == entry.num_samples == 1 and entry.start_position == seq.num_tokens - 1
        assert seq.num_output_tokens + output.num_steps <= params.max_tokens
        assert seq.num_tokens + output.num_steps <= scheduler.max_model_len
        assert seq.num_output_tokens >= params.min_tokens or seq.num_output_tokens + output.num_steps <= params.min_tokens
        assert len(entry.block_table) * BLOCK_SIZE >= entry.start_position + output.num_steps


def check_invariants(scheduler, runner):
    """Reference counts, queue membership and every running sequence's computed KV content."""
    bm = scheduler.block_manager
    expected = np.zeros(bm.num_blocks, dtype=np.int64)
    for seq in scheduler.running:
        assert seq.status is SequenceStatus.RUNNING
        np.add.at(expected, seq.block_table, 1)
        runner.check_context(seq, seq.block_table, seq.num_computed_tokens)
        assert seq.num_cached_tokens % BLOCK_SIZE == 0 and seq.num_cached_tokens < seq.num_prompt_tokens
    for seq in scheduler.waiting:
        assert seq.status is SequenceStatus.WAITING and seq.block_table == [] and seq.num_computed_tokens == 0
    assert [bm.ref_count(b) for b in range(bm.num_blocks)] == expected.tolist()
    assert expected[NULL_BLOCK] == 0
    assert bm.metrics().num_used_blocks == np.count_nonzero(expected)
    assert sum(seq.fanout for seq in scheduler.running) <= scheduler.max_num_seqs


def check_step_shape(scheduler, output, remaining_before):
    """Budgets, and decodes (1 remaining token) of running sequences before any prefill chunk."""
    assert len(output.scheduled) <= scheduler.max_num_seqs
    assert output.num_batched_tokens <= scheduler.max_num_batched_tokens
    is_decode = [remaining_before.get(id(e.seq)) == 1 for e in output.scheduled]
    assert is_decode == sorted(is_decode, reverse=True)
    scheduled = {id(e.seq) for e in output.scheduled} | {id(s) for s in output.preempted + output.failed}
    if not all(is_decode):
        assert all(key in scheduled for key, remaining in remaining_before.items() if remaining == 1)
    if output.preempted:
        preempted = {id(seq) for seq in output.preempted}
        assert all(id(e.seq) in remaining_before and id(e.seq) not in preempted for e in output.scheduled), \
            "admitted in a preempting step"
    for entry in output.scheduled:
        assert (entry.num_samples > 0) == (entry.start_position + entry.num_new_tokens == entry.seq.num_tokens)
        # (a chunk sized before its allocation took a scheduled victim out may leave the victim's tokens unused)
        if not entry.num_samples and not output.preempted:
            assert output.num_batched_tokens == scheduler.max_num_batched_tokens, "a chunk left budget unused"


def check_all_blocks_back(scheduler):
    bm = scheduler.block_manager
    metrics = bm.metrics()
    assert scheduler.num_unfinished_requests == 0 and not scheduler.running and not scheduler.waiting
    assert metrics.num_used_blocks == 0 and metrics.num_free_blocks == bm.num_usable_blocks
    assert all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))
    # Cached blocks must still be evictable: one sequence can take the whole pool.
    probe = Sequence("probe", 0, [2] * (bm.num_usable_blocks * BLOCK_SIZE), SamplingParams(), 0, 0.0, 0)
    assert bm.admit(probe, [], probe.num_tokens)
    assert bm.metrics().num_cached_blocks == 0
    bm.free(probe)
    assert bm.num_free_blocks == bm.num_usable_blocks


def random_params(rng):
    max_tokens = int(rng.integers(1, 24))
    return SamplingParams(n=int(rng.choice([1, 1, 2, 3])), max_tokens=max_tokens,
                          min_tokens=int(rng.integers(0, max_tokens + 1)) if rng.random() < 0.3 else 0,
                          stop_token_ids=(int(rng.integers(2, VOCAB)),) if rng.random() < 0.3 else (),
                          ignore_eos=bool(rng.random() < 0.2))


@pytest.mark.parametrize("seed, num_blocks, max_num_seqs, budget, chunked, decode_steps", [
    (0, 48, 6, 16, True, 1),
    (1, 20, 4, 12, True, 1),  # a tight pool: preemptions
    (2, 96, 8, 40, False, 1),
    (3, 10, 3, 7, True, 1),  # a pool smaller than max_model_len: preemptions, oversized sequences fail
    (4, 30, 16, 64, True, 1),
    (5, 16, 8, 5, True, 1),  # fewer budget tokens than running sequences
    (6, 48, 6, 16, True, 4),  # multi-step decode calls
    (7, 20, 4, 12, True, 8),  # multi-step decode calls in a tight pool
])
def test_random_workload_keeps_kv_content_and_returns_every_block(seed, num_blocks, max_num_seqs, budget,
                                                                   chunked, decode_steps):
    max_model_len = 40
    rng, scheduler, runner = setup(seed, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=budget, max_model_len=max_model_len,
                                   enable_chunked_prefill=chunked, decode_steps=decode_steps, decode_call_tokens=16)
    system_prompts = [random_prompt(rng, int(rng.integers(4, 14))) for _ in range(3)]
    finish_reasons = set()
    num_requests = num_failed = 0
    num_calls = [0, 0]  # single-step calls, multi-step calls
    for step_index in range(1000):
        arriving = step_index < 300
        for _ in range(rng.poisson(0.6) if arriving else 0):
            prefix = system_prompts[rng.integers(3)] if rng.random() < 0.6 else []
            prompt = (prefix + random_prompt(rng, int(rng.integers(1, 14))))[:max_model_len]
            if scheduler.block_manager.blocks_needed(len(prompt)) > num_blocks - 1:
                continue
            scheduler.add_request(f"req{num_requests}", prompt, random_params(rng),
                                  priority=int(rng.integers(0, 3)))
            num_requests += 1
        live = [seq.request_id for seq in scheduler.running + scheduler.waiting]
        if live and rng.random() < 0.05:
            scheduler.abort(live[rng.integers(len(live))])
        remaining_before = {id(s): s.num_tokens - s.num_computed_tokens for s in scheduler.running}
        output = scheduler.schedule()
        check_step_shape(scheduler, output, remaining_before)
        check_model_steps(scheduler, output)
        num_calls[output.num_steps > 1] += 1
        changed = run_model_steps(scheduler, runner, output, rng)
        running = scheduler.running
        if running and rng.random() < 0.03:  # a stop string the engine detected
            scheduler.finish(running[rng.integers(len(running))], "stop")
        finish_reasons |= {seq.finish_reason for seq in changed + list(output.failed) if seq.is_finished}
        num_failed += len(output.failed)
        check_invariants(scheduler, runner)
        if not arriving and not scheduler.num_unfinished_requests:
            break
    check_all_blocks_back(scheduler)
    assert num_requests > 100 and {"stop", "length"} <= finish_reasons
    metrics = scheduler.metrics()
    assert metrics.blocks.prefix_cache_hits > 0
    if num_blocks < 24:
        assert metrics.num_preemptions > 0
    assert (num_failed > 0) == ((num_blocks - 1) * BLOCK_SIZE < max_model_len)
    assert (num_calls[1] > 0) == (decode_steps > 1), num_calls


def test_decodes_continue_every_step_while_a_long_prompt_is_chunked():
    rng, scheduler, runner = setup(10, max_num_batched_tokens=8, max_model_len=128)
    params = SamplingParams(max_tokens=100, ignore_eos=True)
    streams = [scheduler.add_request(f"s{i}", random_prompt(rng, 3), params) for i in range(2)]
    step(scheduler, runner)
    long_prompt = scheduler.add_request("long", random_prompt(rng, 60), params)
    chunks = []
    while long_prompt.num_output_tokens == 0:
        lengths = [seq.num_tokens for seq in streams]
        output, _ = step(scheduler, runner)
        assert [seq.num_tokens for seq in streams] == [n + 1 for n in lengths]
        chunks += [e.num_new_tokens for e in output.scheduled if e.seq is long_prompt]
    assert chunks == [6] * 10
    check_invariants(scheduler, runner)


def test_shared_system_prompt_is_prefilled_once():
    rng, scheduler, runner = setup(11)
    system = random_prompt(rng, 3 * BLOCK_SIZE + 2)
    first = scheduler.add_request("a", system + random_prompt(rng, 5))
    step(scheduler, runner)
    second = scheduler.add_request("b", system + random_prompt(rng, 3))
    output, _ = step(scheduler, runner)
    (entry,) = [e for e in output.scheduled if e.seq is second]
    assert second.num_cached_tokens == 3 * BLOCK_SIZE
    assert entry.start_position == 3 * BLOCK_SIZE and entry.num_new_tokens == second.num_prompt_tokens - 3 * BLOCK_SIZE
    assert second.block_table[:3] == first.block_table[:3]
    assert second.block_table[3] != first.block_table[3]
    metrics = scheduler.metrics().blocks
    assert metrics.prefix_cache_hits == 3 * BLOCK_SIZE
    assert metrics.prefix_cache_queries == first.num_prompt_tokens + second.num_prompt_tokens
    check_invariants(scheduler, runner)


def test_forked_samples_share_the_prompt_and_copy_its_partial_block():
    rng, scheduler, runner = setup(12)
    prompt = random_prompt(rng, 2 * BLOCK_SIZE + 1)
    parent = scheduler.add_request("fork", prompt, SamplingParams(n=3, max_tokens=12, ignore_eos=True))
    output = scheduler.schedule()
    assert [e.num_samples for e in output.scheduled] == [3]
    runner.run(output)
    first_tokens = [11, 12, 13]
    changed = scheduler.update(output, [first_tokens])
    assert [seq.seq_index for seq in changed] == [0, 1, 2]
    assert [seq.output_token_ids for seq in changed] == [[t] for t in first_tokens]
    shared_tail = parent.block_table[2]
    assert all(seq.block_table == parent.block_table for seq in changed)
    output, _ = step(scheduler, runner)
    # Every writer but the last holder of the shared tail gets a private copy of it.
    assert sorted(src for src, _ in output.block_copies) == [shared_tail, shared_tail]
    tails = [seq.block_table[2] for seq in changed]
    assert len(set(tails)) == 3 and shared_tail in tails
    assert {dst for _, dst in output.block_copies} == set(tails) - {shared_tail}
    while scheduler.num_unfinished_requests:
        step(scheduler, runner)
        check_invariants(scheduler, runner)
    assert all(seq.num_output_tokens == 12 for seq in changed)
    assert len({tuple(seq.output_token_ids) for seq in changed}) == 3
    check_all_blocks_back(scheduler)


def test_preemption_takes_the_newest_and_requeues_it_first():
    rng, scheduler, runner = setup(13, num_blocks=9, max_num_seqs=2, max_model_len=64)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    old = scheduler.add_request("old", random_prompt(rng, BLOCK_SIZE * 2), params, arrival_time=0.0)
    new = scheduler.add_request("new", random_prompt(rng, BLOCK_SIZE * 2), params, arrival_time=1.0)
    step(scheduler, runner)
    # Ranked before "new" by arrival time, but a preempted sequence resumes first.
    earlier = scheduler.add_request("earlier", random_prompt(rng, 3), params, arrival_time=0.5)
    preempted = []
    while not preempted:
        output, _ = step(scheduler, runner)
        preempted = list(output.preempted)
    assert preempted == [new] and new.status is SequenceStatus.WAITING and new.block_table == []
    assert scheduler.waiting[0] is new and old.status is SequenceStatus.RUNNING
    while scheduler.num_unfinished_requests:
        step(scheduler, runner)
        check_invariants(scheduler, runner)
    assert [seq.num_output_tokens for seq in (old, new, earlier)] == [20, 20, 20]
    assert scheduler.metrics().num_preemptions >= 1 and new.num_preemptions >= 1
    check_all_blocks_back(scheduler)


def test_a_high_priority_prompt_takes_blocks_from_lower_priority_decodes():
    # Decodes are scheduled before prefill chunks; a high-priority prompt that runs out of blocks
    # mid-prefill must preempt the lower-priority decodes already in the step, not itself.
    rng, scheduler, runner = setup(21, num_blocks=17, max_num_seqs=8, max_num_batched_tokens=8)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    low = [scheduler.add_request(f"low{i}", random_prompt(rng, 4), params, priority=1) for i in range(3)]
    for _ in range(3):
        step(scheduler, runner)
    prompt_len = int(rng.integers(36, 45))
    high = scheduler.add_request("high", random_prompt(rng, prompt_len), SamplingParams(max_tokens=5), priority=0)
    computed, num_steps, preempted = 0, 0, []
    while not high.num_output_tokens:
        output, _ = step(scheduler, runner)
        check_invariants(scheduler, runner)
        computed += sum(e.num_new_tokens for e in output.scheduled if e.seq is high)
        preempted += output.preempted
        num_steps += 1
    assert high.num_preemptions == 0 and computed == prompt_len
    # at worst the 3 decodes take 3 of each step's 8 tokens
    assert num_steps <= -(-prompt_len // 5) and preempted and all(seq in low for seq in preempted)
    while scheduler.num_unfinished_requests:
        step(scheduler, runner)
        check_invariants(scheduler, runner)
    assert [seq.num_output_tokens for seq in low] == [30] * 3
    check_all_blocks_back(scheduler)


def test_lower_priority_value_is_served_first_and_ties_are_fcfs():
    rng, scheduler, runner = setup(14, max_num_seqs=1)
    order = []
    for name, priority in (("low", 5), ("high_first", 0), ("high_second", 0), ("mid", 2)):
        scheduler.add_request(name, random_prompt(rng, 5), SamplingParams(max_tokens=2),
                              priority=priority)
    while scheduler.num_unfinished_requests:
        output, _ = step(scheduler, runner)
        order += [e.seq.request_id for e in output.scheduled if e.start_position == 0]
    assert order == ["high_first", "high_second", "mid", "low"]


def test_stop_conditions():
    scheduler = make_scheduler(max_model_len=12)
    cases = {
        "eos": (SamplingParams(max_tokens=10), [5, EOS, 6], "stop", 2),
        "eos_ignored": (SamplingParams(max_tokens=3, ignore_eos=True), [EOS, EOS, EOS], "length", 3),
        "min_tokens": (SamplingParams(max_tokens=10, min_tokens=3), [EOS, EOS, EOS, 7], "stop", 3),
        "stop_id": (SamplingParams(max_tokens=10, stop_token_ids=(9,)), [4, 9], "stop", 2),
        "max_model_len": (SamplingParams(max_tokens=10), [4, 5, 6, 7, 8], "length", 4),
    }
    seqs = {name: scheduler.add_request(name, list(range(20, 28)), params)
            for name, (params, _, _, _) in cases.items()}
    for _ in range(10):
        output = scheduler.schedule()
        scheduler.update(output, {e.seq.seq_id: cases[e.seq.request_id][1][e.seq.num_output_tokens]
                                  for e in output.scheduled})
    for name, (_, _, reason, num_outputs) in cases.items():
        assert (seqs[name].finish_reason, seqs[name].num_output_tokens) == (reason, num_outputs), name
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_usable_blocks


def test_abort_frees_blocks_at_once_in_every_state():
    rng, scheduler, runner = setup(15, max_num_batched_tokens=8)
    fork = scheduler.add_request("fork", random_prompt(rng, 6), SamplingParams(n=2))
    prefilling = scheduler.add_request("long", random_prompt(rng, 30))
    step(scheduler, runner)
    queued = scheduler.add_request("queued", random_prompt(rng, 5))
    assert prefilling.block_table and queued.status is SequenceStatus.WAITING
    aborted = scheduler.abort("fork")
    assert len(aborted) == 2 and all(seq.finish_reason == "abort" for seq in aborted)
    assert [seq.request_id for seq in scheduler.running] == ["long"]
    output = scheduler.schedule()
    runner.run(output)
    scheduler.abort("long")
    scheduler.abort("queued")
    assert scheduler.update(output, [None] * len(output.scheduled)) == []
    assert scheduler.abort("long") == [] and scheduler.abort("unknown") == []
    check_all_blocks_back(scheduler)
    assert fork.is_finished


def test_a_sequence_that_cannot_fit_alone_fails_instead_of_looping():
    rng, scheduler, runner = setup(16, num_blocks=4, max_model_len=64)
    seq = scheduler.add_request("big", random_prompt(rng, 10),
                                SamplingParams(max_tokens=20, ignore_eos=True))
    failed = []
    for _ in range(10):
        output, _ = step(scheduler, runner)
        failed += output.failed
    assert failed == [seq] and seq.finish_reason == "abort"
    assert "needs 4 KV cache blocks" in seq.error and "only 3" in seq.error
    assert seq.num_tokens == 3 * BLOCK_SIZE + 1
    check_all_blocks_back(scheduler)


def test_bad_requests_are_rejected():
    scheduler = make_scheduler(num_blocks=8, max_num_seqs=4, max_model_len=40)
    with pytest.raises(RequestError, match="max_model_len is 40"):
        scheduler.add_request("long", [3] * 41)
    with pytest.raises(RequestError, match="KV cache holds only 28"):
        scheduler.add_request("huge", [3] * 29)
    with pytest.raises(RequestError, match="empty prompt"):
        scheduler.add_request("empty", [])
    with pytest.raises(RequestError, match="max_num_seqs"):
        scheduler.add_request("wide", [3], SamplingParams(n=5))
    scheduler.add_request("dup", [3])
    with pytest.raises(RequestError, match="already in use"):
        scheduler.add_request("dup", [3])
    with pytest.raises(ValueError, match="chunked prefill"):
        make_scheduler(max_num_batched_tokens=16, max_model_len=64, enable_chunked_prefill=False)
