"""Ragged paged attention: the XLA path, the C++ CPU kernel and the Pallas kernel (compiled on a GPU, in
interpret mode elsewhere) against the dense reference.

Every case uses fresh random inputs, physical blocks shuffled across the pool, padding tokens and
padding sequences, and fills every pool row no sequence owns (the null block included) with NaN.
Pallas interpret mode starts each output buffer as NaN, so an output row the kernel forgets to write
fails the comparison.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ON_GPU, PALLAS_MODE
from jaxinfer.cache.attention_metadata import AttentionMetadata
from jaxinfer.cache.kv_pool import LayerKVCache, init_layer_cache, write_kv
from pallas_kernels import cpu_paged_attention
from pallas_kernels import ragged_paged_attention as rpa
from pallas_kernels.query_tiles import num_query_tiles, query_tiles
from pallas_kernels.ragged_paged_attention_xla import KV_CHUNK_TOKENS, PREFILL_QUERY_TILE, split_tile_bounds

HEAD_DIM = 64
SM_SCALE = HEAD_DIM ** -0.5
needs_cpu_kernel = pytest.mark.skipif(not cpu_paged_attention.available(),
                                      reason="needs an x86-64 CPU with AVX2/FMA and a C++ compiler")
# Every implementation that runs on this backend: the XLA path, the C++ kernel (CPU) and the Pallas kernel.
IMPLEMENTATIONS = ["xla", pytest.param("cpu", marks=needs_cpu_kernel), PALLAS_MODE]


@dataclasses.dataclass(frozen=True)
class Batch:
    q: jax.Array
    cache: LayerKVCache
    metadata: AttentionMetadata
    num_real_tokens: int


def make_batch(seed: int, chunks: list[tuple[int, int]], *, block_size: int, num_q_heads: int, num_kv_heads: int,
               head_dim: int = HEAD_DIM, kv_dtype: str = "float32", q_dtype=jnp.float32, padding_tokens: int = 3,
               padding_seqs: int = 1, spare_blocks: int = 3) -> Batch:
    """chunks: (new tokens, context length including them) per sequence."""
    rng = np.random.default_rng(seed)
    blocks_per_seq = [-(-context // block_size) for _, context in chunks]
    num_seqs, width = len(chunks) + padding_seqs, max(blocks_per_seq) + 1
    num_blocks = 1 + sum(blocks_per_seq) + spare_blocks
    physical = iter(rng.permutation(np.arange(1, num_blocks)))
    block_tables = np.zeros((num_seqs, width), np.int32)
    for seq, count in enumerate(blocks_per_seq):
        block_tables[seq, :count] = [next(physical) for _ in range(count)]

    cache = init_layer_cache(num_blocks, block_size, num_kv_heads, head_dim, kv_dtype)
    poisoned = {name: jnp.full_like(value, jnp.nan) for name, value in vars(cache).items()
                if value is not None and jnp.issubdtype(value.dtype, jnp.floating)}
    cache = dataclasses.replace(cache, **poisoned)
    positions = [(seq, pos) for seq, (_, context) in enumerate(chunks) for pos in range(context)]
    slots = np.array([block_tables[seq, pos // block_size] * block_size + pos % block_size for seq, pos in positions],
                     np.int32)
    kv_shape = (len(slots), num_kv_heads, head_dim)
    cache = write_kv(cache, jnp.asarray(rng.standard_normal(kv_shape), q_dtype),
                     jnp.asarray(rng.standard_normal(kv_shape), q_dtype), jnp.asarray(slots))

    q_lens = [q_len for q_len, _ in chunks]
    num_real = sum(q_lens)
    starts = np.concatenate([[0], np.cumsum(q_lens), np.full(padding_seqs, num_real)]).astype(np.int32)
    seq_lens = np.array([context for _, context in chunks] + [0] * padding_seqs, np.int32)
    metadata = AttentionMetadata(slot_mapping=jnp.zeros(num_real + padding_tokens, jnp.int32),
                                 block_tables=jnp.asarray(block_tables), seq_lens=jnp.asarray(seq_lens),
                                 query_start_loc=jnp.asarray(starts))
    q = jnp.asarray(rng.standard_normal((num_real + padding_tokens, num_q_heads, head_dim)), q_dtype)
    return Batch(q, cache, metadata, num_real)


@functools.cache
def _compiled(implementation: str, soft_cap: float | None):
    return jax.jit(functools.partial(rpa.ragged_paged_attention, sm_scale=SM_SCALE, soft_cap=soft_cap,
                                     implementation=implementation))


def check_against_reference(batch: Batch, implementation: str, *, tolerance: float, soft_cap: float | None = None):
    out = np.asarray(_compiled(implementation, soft_cap)(batch.q, batch.cache, batch.metadata), np.float32)
    ref = np.asarray(_compiled("reference", soft_cap)(batch.q, batch.cache, batch.metadata), np.float32)
    assert out.dtype == ref.dtype and out.shape == batch.q.shape
    assert np.isfinite(ref).all()
    assert np.isfinite(out).all(), f"{implementation}: non-finite rows {np.unique(np.nonzero(~np.isfinite(out))[0])}"
    np.testing.assert_array_equal(out[batch.num_real_tokens:], 0.0)
    relative_error = np.max(np.abs(out - ref)) / np.max(np.abs(ref))
    assert relative_error <= tolerance, f"{implementation}: relative error {relative_error:.2e} > {tolerance:.0e}"


def mixed_chunks(block_size: int) -> list[tuple[int, int]]:
    """Decodes at lengths 1, block-1, block, block+1 and long, beside prefill chunks at several offsets."""
    long = 4 * block_size + 3
    return [(1, 1), (block_size + 1, block_size + 1), (1, block_size - 1), (2, block_size), (1, block_size + 1),
            (block_size - 1, long), (1, long), (3, 2 * block_size + 2)]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(2, 2), (3, 1), (8, 2), (8, 1)])
def test_mixed_batch_matches_reference(implementation, block_size, num_q_heads, num_kv_heads):
    batch = make_batch(block_size * 10 + num_q_heads, mixed_chunks(block_size), block_size=block_size,
                       num_q_heads=num_q_heads, num_kv_heads=num_kv_heads)
    check_against_reference(batch, implementation, tolerance=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_decode_batch_matches_reference(implementation, block_size):
    lengths = [1, block_size - 1, block_size, block_size + 1, 5 * block_size + 2, 2 * KV_CHUNK_TOKENS + 1]
    batch = make_batch(block_size, [(1, length) for length in lengths], block_size=block_size, num_q_heads=9,
                       num_kv_heads=3, padding_tokens=1)
    check_against_reference(batch, implementation, tolerance=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("kv_dtype,q_dtype,tolerance", [("int8", jnp.float32, 1e-5), ("fp8", jnp.float32, 1e-5),
                                                        ("bfloat16", jnp.bfloat16, 1e-2), ("fp8", jnp.bfloat16, 1e-2)])
def test_storage_dtypes_match_reference(implementation, kv_dtype, q_dtype, tolerance):
    batch = make_batch(7, mixed_chunks(16), block_size=16, num_q_heads=6, num_kv_heads=2, kv_dtype=kv_dtype,
                       q_dtype=q_dtype)
    check_against_reference(batch, implementation, tolerance=tolerance)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_soft_cap_and_head_dim_128(implementation):
    batch = make_batch(11, mixed_chunks(16), block_size=16, num_q_heads=4, num_kv_heads=1, head_dim=128)
    check_against_reference(batch, implementation, tolerance=1e-5, soft_cap=0.5)


@pytest.mark.parametrize("implementation", ["xla", pytest.param("cpu", marks=needs_cpu_kernel)])
def test_long_prefill_chunks_match_reference(implementation):
    """Long chunks beside a decode: the XLA path takes long query tiles over several KV chunks, the C++
    kernel many 16-token tiles (the last one partial) over contexts past its 64-position chunks."""
    chunks = [(150, 700), (130, 130), (1, 300)]
    batch = make_batch(5, chunks, block_size=16, num_q_heads=9, num_kv_heads=3)
    assert 150 > 4 * PREFILL_QUERY_TILE
    assert 700 > 2 * KV_CHUNK_TOKENS
    check_against_reference(batch, implementation, tolerance=1e-5)


def test_reference_matches_numpy_loop():
    """The oracle itself against a per-token numpy loop over the block table."""
    batch = make_batch(3, [(2, 5), (1, 9), (3, 3)], block_size=4, num_q_heads=4, num_kv_heads=2, head_dim=8)
    out = np.asarray(rpa.reference_ragged_paged_attention(batch.q, batch.cache, batch.metadata, sm_scale=0.3))
    q, k_pool, v_pool = (np.asarray(a, np.float64) for a in (batch.q, batch.cache.k, batch.cache.v))
    starts, seq_lens = np.asarray(batch.metadata.query_start_loc), np.asarray(batch.metadata.seq_lens)
    tables = np.asarray(batch.metadata.block_tables)
    expected = np.zeros_like(q)
    for seq in range(len(seq_lens)):
        for token in range(starts[seq], starts[seq + 1]):
            position = seq_lens[seq] - (starts[seq + 1] - starts[seq]) + token - starts[seq]
            slots = [(tables[seq, p // 4], p % 4) for p in range(position + 1)]
            for head in range(4):
                keys = np.stack([k_pool[b, o, head // 2] for b, o in slots])
                values = np.stack([v_pool[b, o, head // 2] for b, o in slots])
                logits = keys @ q[token, head] * 0.3
                weights = np.exp(logits - logits.max())
                expected[token, head] = weights @ values / weights.sum()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("starts,seq_lens,num_tokens", [
    ([0, 5, 5, 6, 23, 23], [9, 0, 1, 40, 0], 27),  # empty sequences, padding tokens, a padding sequence
    ([0, 5, 10], [5, 12], 15),  # every group 1 past a multiple of the tile: the static bound is reached
], ids=["ragged", "worst-case"])
def test_query_tiles_cover_each_token_once(starts, seq_lens, num_tokens):
    tile, num_seqs = 4, len(seq_lens)
    starts, seq_lens = np.array(starts, np.int32), np.array(seq_lens, np.int32)
    metadata = AttentionMetadata(jnp.zeros(num_tokens, jnp.int32), jnp.zeros((num_seqs, 3), jnp.int32),
                                 jnp.asarray(seq_lens), jnp.asarray(starts))
    tiles = jax.tree.map(np.asarray, vars(query_tiles(metadata, num_tokens, tile)))
    assert len(tiles["seq"]) == num_query_tiles(num_tokens, num_seqs, tile)
    for token in range(num_tokens):
        seq = np.searchsorted(starts, token, side="right") - 1
        owner, row = tiles["token_tile"][token], tiles["token_row"][token]
        assert tiles["start"][owner] + row == token and row < tiles["count"][owner]
        if token < starts[-1]:
            position = seq_lens[seq] - (starts[seq + 1] - starts[seq]) + token - starts[seq]
            assert tiles["seq"][owner] == seq and tiles["first_pos"][owner] + row == position
            assert tiles["kv_len"][owner] == tiles["first_pos"][owner] + tiles["count"][owner]
        else:
            assert tiles["kv_len"][owner] == 0
    assert tiles["count"].sum() == num_tokens


@pytest.mark.parametrize("seed", range(4))
def test_split_tiles_cover_decodes_and_chunks_within_their_bounds(seed):
    """The XLA path's decode tiles (1 token) and prefill tiles (chunks of >= 2 tokens) each cover their
    tokens once, also for worst cases: every chunk 2 tokens, or one past a multiple of the tile."""
    rng = np.random.default_rng(seed)
    num_seqs, num_tokens = 32, 256
    tile = PREFILL_QUERY_TILE
    lengths = [rng.choice([1, 2, tile + 1, int(rng.integers(1, 3 * tile))]) for _ in range(num_seqs)]
    worst = [2] * (num_seqs - 1) + [num_tokens - 2 * (num_seqs - 1)]  # 38 tiles of the bound's 39
    q_lens = np.array(lengths if seed else worst)
    while q_lens.sum() > num_tokens - seed:  # seed tokens of batch padding
        q_lens[np.argmax(q_lens)] -= 1
    starts = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    seq_lens = (q_lens + rng.integers(0, 100, num_seqs)).astype(np.int32)
    metadata = AttentionMetadata(jnp.zeros(num_tokens, jnp.int32), jnp.zeros((num_seqs, 3), jnp.int32),
                                 jnp.asarray(seq_lens), jnp.asarray(starts))
    bounds = split_tile_bounds(num_tokens, num_seqs)
    for tile_size, selected, bound in ((1, q_lens == 1, bounds[0]), (tile, q_lens > 1, bounds[1])):
        tiles = jax.tree.map(np.asarray, vars(query_tiles(metadata, num_tokens, tile_size,
                                                          selected=jnp.asarray(selected), num_tiles=bound)))
        tokens = [t for s in np.nonzero(selected)[0] for t in range(starts[s], starts[s + 1])]
        assert tiles["count"].sum() == len(tokens)
        for token in tokens:
            owner, row = tiles["token_tile"][token], tiles["token_row"][token]
            assert tiles["start"][owner] + row == token and row < tiles["count"][owner]


@pytest.mark.skipif(ON_GPU, reason="checks that a CPU never runs the Pallas kernel")
def test_default_implementation_never_interprets(monkeypatch):
    cache = init_layer_cache(4, 8, 1, HEAD_DIM, "float32")
    odd_head_dim = init_layer_cache(4, 8, 1, 12, "float32")
    assert rpa.default_implementation(cache, "gpu") == "pallas"
    assert rpa.default_implementation(cache, "cpu") == ("cpu" if cpu_paged_attention.available() else "xla")
    assert rpa.default_implementation(odd_head_dim, "cpu") == "xla"
    assert rpa.default_implementation(cache, "tpu") == "xla"

    def no_pallas(*args, **kwargs):
        raise AssertionError("the default implementation on CPU must not call pallas_call")

    monkeypatch.setattr(rpa.pl, "pallas_call", no_pallas)
    batch = make_batch(2, [(1, 5), (2, 7)], block_size=8, num_q_heads=2, num_kv_heads=1)
    out = rpa.ragged_paged_attention(batch.q, batch.cache, batch.metadata, sm_scale=SM_SCALE)
    assert np.isfinite(np.asarray(out)).all()


def kernel_against_reference(batch: Batch, soft_cap: float | None = None) -> np.ndarray:
    """The C++ kernel's output (called directly, no jit) after checking every row against the reference:
    to float32's precision, the rows of prefill chunks to bfloat16's where they run on AMX."""
    sm_scale = batch.q.shape[2] ** -0.5
    out = np.asarray(cpu_paged_attention.paged_attention(batch.q * sm_scale, batch.cache, batch.metadata, soft_cap))
    ref = np.asarray(rpa.reference_ragged_paged_attention(batch.q, batch.cache, batch.metadata, sm_scale=sm_scale,
                                                          soft_cap=soft_cap))
    np.testing.assert_array_equal(out[batch.num_real_tokens:], 0.0)
    starts = np.asarray(batch.metadata.query_start_loc)
    prefill = np.zeros(len(out), bool)
    for start, end in zip(starts[:-1], starts[1:]):
        prefill[start:end] = end - start > 1
    scale = float(np.max(np.abs(ref)))
    np.testing.assert_allclose(out[~prefill], ref[~prefill], rtol=1e-5, atol=1e-5 * scale)
    tolerance = cpu_paged_attention.bf16_prefill_tolerance(batch.cache) or 1e-5
    np.testing.assert_allclose(out[prefill], ref[prefill], rtol=1e-5, atol=tolerance * scale)
    return out


@needs_cpu_kernel
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", [(9, 3, 64), (8, 1, 16), (4, 4, 48), (6, 2, 128),
                                                              (16, 2, 64)])
def test_cpu_kernel_covers_long_contexts_and_head_layouts(num_q_heads, num_kv_heads, head_dim):
    """Decodes up to 1000 positions and prefill chunks (one under a tile, one over several tiles with a
    prefix) for GQA groups of 1-8 query heads (one pass of the decode loop or several) and head dims
    of one to eight 16-feature groups; the step compiles to the kernel, with no XLA loop."""
    lengths = [1, 7, 9, 300, 1000]
    chunks = [(1, length) for length in lengths] + [(5, 5), (37, 90)]
    batch = make_batch(num_q_heads + head_dim, chunks, block_size=8, num_q_heads=num_q_heads,
                       num_kv_heads=num_kv_heads, head_dim=head_dim, padding_tokens=1)
    kernel = jax.jit(functools.partial(rpa.ragged_paged_attention, sm_scale=head_dim ** -0.5, implementation="cpu"))
    hlo = kernel.lower(batch.q, batch.cache, batch.metadata).as_text()
    assert cpu_paged_attention.TARGET in hlo and "while" not in hlo
    out = np.asarray(kernel(batch.q, batch.cache, batch.metadata))
    ref = np.asarray(jax.jit(functools.partial(rpa.reference_ragged_paged_attention, sm_scale=head_dim ** -0.5))(
        batch.q, batch.cache, batch.metadata))
    np.testing.assert_array_equal(out[batch.num_real_tokens:], 0.0)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(ref))))


@needs_cpu_kernel
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(9, 3), (6, 2), (4, 4), (8, 1)])
@pytest.mark.parametrize("chunks,kv_dtype,soft_cap", [
    ([(6, 30), (1, 333)], "bfloat16", None),  # beside a prefill chunk
    ([(1, 1)], "float32", None),  # one position: the first part reads none
    ([(1, 3)], "int8", 0.8),
    ([(1, 77)], "fp8", None),
])
def test_cpu_kernel_splits_a_lone_decode_by_positions_and_matches_the_reference(num_q_heads, num_kv_heads, chunks,
                                                                                 kv_dtype, soft_cap):
    """A batch-1 decode runs as two items, each over half its positions with its own softmax peak and
    sum, merged afterwards; an empty half, odd lengths, quantized pools and a soft cap included."""
    kernel_against_reference(make_batch(num_q_heads, chunks, block_size=16, num_q_heads=num_q_heads,
                                        num_kv_heads=num_kv_heads, head_dim=64, kv_dtype=kv_dtype), soft_cap=soft_cap)


@needs_cpu_kernel
@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16", "int8", "fp8"])
@pytest.mark.parametrize("head_dim", [48, 64])
def test_cpu_kernel_decodes_every_pool_dtype_in_either_register_width(kv_dtype, head_dim):
    """Decodes over each pool storage type at a head_dim the AVX-512 build runs in 16-float registers
    (64) and one it runs in 8-float registers (48, not a multiple of 32), four query heads per kv head
    (one pass at 16 floats, two at 8), contexts ending mid-chunk."""
    chunks = [(1, length) for length in (1, 5, 31, 33, 250)]
    kernel_against_reference(make_batch(head_dim, chunks, block_size=16, num_q_heads=8, num_kv_heads=2,
                                        head_dim=head_dim, kv_dtype=kv_dtype), soft_cap=0.8)


@needs_cpu_kernel
def test_cpu_kernel_shares_a_large_batch_with_the_thread_pool_and_matches_the_reference():
    """Sixteen decodes of 150-400 positions (over the kernel's threshold for splitting its work across
    XLA's thread pool) around prefill chunks of 5 and 40 tokens."""
    rng = np.random.default_rng(11)
    chunks = [(1, int(length)) for length in rng.integers(150, 400, 8)] + [(5, 40), (40, 200)]
    chunks += [(1, int(length)) for length in rng.integers(150, 400, 8)]
    assert sum(length for new, length in chunks if new == 1) > 2048
    kernel_against_reference(make_batch(12, chunks, block_size=16, num_q_heads=9, num_kv_heads=3, head_dim=64))


@needs_cpu_kernel
@pytest.mark.parametrize("kv_dtype", ["bfloat16", "int8", "fp8"])
def test_cpu_kernel_prefill_tiles_match_the_reference(kv_dtype):
    """Prefill only: chunks of 2, 16 (one whole tile), 17 and 33 tokens (a partial last tile), a
    chunk after a long prefix and a first chunk, quantized pools, soft cap."""
    chunks = [(2, 2), (16, 16), (17, 300), (33, 40), (64, 64)]
    batch = make_batch(13, chunks, block_size=16, num_q_heads=9, num_kv_heads=3, head_dim=64, kv_dtype=kv_dtype)
    kernel_against_reference(batch, soft_cap=0.8)


@needs_cpu_kernel
@pytest.mark.parametrize("block_size,num_q_heads,num_kv_heads,head_dim", [(16, 9, 3, 64), (32, 8, 2, 128), (48, 4, 4, 32),
                                                                          (8, 6, 2, 64), (24, 8, 1, 48), (12, 6, 2, 64)])
def test_cpu_kernel_prefill_over_bfloat16_pools_matches_the_reference(block_size, num_q_heads, num_kv_heads, head_dim):
    """bfloat16 pools, whose prefill tiles multiply in bfloat16 where the CPU can: on AMX-BF16 (16
    positions of a block read as one tile, 32-position chunks of softmax weights; blocks of 16 and 48
    here) or with vdpbf16ps (8 positions of a block read in place; blocks of 8 and 24 on any CPU with
    AVX512-BF16, and 16 and 48 too where it has no AMX). Blocks of 12 keep the FMA loop. 4-16 query rows per token, head dims of
    three to eight 16-feature groups, chunks that end mid-tile and mid-block after prefixes, where
    the pool's unused rows hold NaN, beside decodes."""
    chunks = [(16, 16), (33, 33), (70, 301), (2, 95), (1, 130), (129, 129)]
    batch = make_batch(block_size + head_dim, chunks, block_size=block_size, num_q_heads=num_q_heads,
                       num_kv_heads=num_kv_heads, head_dim=head_dim, kv_dtype="bfloat16")
    kernel_against_reference(batch)


@needs_cpu_kernel
@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("chunks", [[(1, 1), (1, 40), (1, 700), (17, 17), (40, 300)], [(1, 700)]])
def test_cpu_kernel_finds_a_position_that_outweighs_every_other(kv_dtype, chunks):
    """An attention sink: every query leans along one direction and each sequence's first K row points
    along it, so that position's logits stand near 200 and the others' within about 20 of zero, a gap
    past float32's exp range (88): a softmax that missed it in its peak would overflow, one that
    masked it would not give its V row. Decodes (a lone one split in two parts) and prefill chunks, short and long contexts."""
    head_dim, num_kv_heads, group = 64, 3, 3
    batch = make_batch(21, chunks, block_size=16, num_q_heads=num_kv_heads * group, num_kv_heads=num_kv_heads,
                       head_dim=head_dim, kv_dtype=kv_dtype)
    rng = np.random.default_rng(22)
    direction = rng.standard_normal(head_dim)
    direction *= 40.0 / np.linalg.norm(direction)
    first_slots = np.asarray(batch.metadata.block_tables)[:len(chunks), 0] * batch.cache.block_size
    k = np.broadcast_to(direction, (len(chunks), num_kv_heads, head_dim))
    v = np.asarray(jnp.asarray(rng.standard_normal((len(chunks), num_kv_heads, head_dim)), kv_dtype), np.float32)
    batch = dataclasses.replace(batch, q=batch.q + jnp.asarray(direction, jnp.float32),
                                cache=write_kv(batch.cache, jnp.asarray(k, jnp.float32), jnp.asarray(v),
                                               jnp.asarray(first_slots, jnp.int32)))
    out = kernel_against_reference(batch)[:batch.num_real_tokens].reshape(-1, num_kv_heads, group, head_dim)
    sink_rows = np.repeat(v, [q_len for q_len, _ in chunks], axis=0)[:, :, None]
    np.testing.assert_allclose(out, np.broadcast_to(sink_rows, out.shape), rtol=0, atol=0.01)


@needs_cpu_kernel
def test_cpu_kernel_refuses_block_ids_outside_the_pool_and_chunks_longer_than_their_context():
    batch = make_batch(6, [(1, 20)], block_size=8, num_q_heads=2, num_kv_heads=1)
    tables = batch.metadata.block_tables.at[0, 1].set(batch.cache.num_blocks)
    with pytest.raises(Exception, match="a block id lies outside the pool"):
        np.asarray(cpu_paged_attention.paged_attention(batch.q, batch.cache,
                                                       dataclasses.replace(batch.metadata, block_tables=tables), None))
    batch = make_batch(6, [(4, 20)], block_size=8, num_q_heads=2, num_kv_heads=1)
    seq_lens = batch.metadata.seq_lens.at[0].set(3)
    with pytest.raises(Exception, match="longer than its context"):
        np.asarray(cpu_paged_attention.paged_attention(batch.q, batch.cache,
                                                       dataclasses.replace(batch.metadata, seq_lens=seq_lens), None))


def test_cpu_implementation_says_when_it_cannot_run(monkeypatch):
    monkeypatch.setattr(cpu_paged_attention, "serves", lambda cache: False)
    batch = make_batch(4, [(1, 5)], block_size=8, num_q_heads=2, num_kv_heads=1)
    assert rpa.default_implementation(batch.cache, "cpu") == "xla"
    with pytest.raises(ValueError, match="the 'cpu' implementation needs the C\\+\\+ attention kernel.*use 'xla'"):
        rpa.ragged_paged_attention(batch.q, batch.cache, batch.metadata, sm_scale=SM_SCALE, implementation="cpu")


def test_bad_arguments_raise_clear_errors():
    batch = make_batch(4, [(1, 5)], block_size=8, num_q_heads=2, num_kv_heads=1)
    call = functools.partial(rpa.ragged_paged_attention, cache=batch.cache, metadata=batch.metadata,
                             sm_scale=SM_SCALE)
    if not ON_GPU:
        with pytest.raises(ValueError, match="compiles for GPU only"):
            call(batch.q, implementation="pallas")
    with pytest.raises(ValueError, match="unknown attention implementation"):
        call(batch.q, implementation="triton")
    with pytest.raises(ValueError, match="num_q_heads a multiple of num_kv_heads"):
        call(batch.q[:, :, :32])
    with pytest.raises(ValueError, match="metadata.slot_mapping"):
        call(batch.q[:2])
    with pytest.raises(ValueError, match="soft_cap"):
        call(batch.q, soft_cap=0.0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_pallas_kernel_lowers_to_valid_triton_ir(monkeypatch):
    """No GPU here: lower the kernel for CUDA (as if on an H100) through jax's Triton lowering rules and verify
    the Triton module, float32 dots included (they must not fall back to TF32). This does not compile PTX."""
    gpu_info = pytest.importorskip("jax._src.pallas.triton.gpu_info")
    triton_lowering = pytest.importorskip("jax._src.pallas.triton.lowering")
    monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: gpu_info.GpuInfo(
        gpu_version=gpu_info.GpuVersion.H100, arch_name="9.0", compute_capability=90))
    modules = []
    lower_module = triton_lowering.lower_jaxpr_to_triton_module

    def recording_lowering(*args, **kwargs):
        result = lower_module(*args, **kwargs)
        modules.append(result.module)
        return result

    monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", recording_lowering)
    for block_size, kv_dtype, q_dtype in ((8, "float32", jnp.float32), (16, "fp8", jnp.bfloat16),
                                          (64, "int8", jnp.float32)):
        batch = make_batch(block_size, mixed_chunks(block_size), block_size=block_size, num_q_heads=9, num_kv_heads=3,
                           kv_dtype=kv_dtype, q_dtype=q_dtype)
        kernel = functools.partial(rpa.pallas_ragged_paged_attention, sm_scale=SM_SCALE, soft_cap=20.0)
        jax.jit(kernel).trace(batch.q, batch.cache, batch.metadata).lower(lowering_platforms=("cuda",))
    assert len(modules) == 3
    for module in modules:
        assert module.operation.verify()
        assert str(module).count("tt.dot") == 2 and "tf32" not in str(module)


@pytest.mark.parametrize("chunks", [[(1, 20), (1, 3), (1, 41)], mixed_chunks(8)], ids=["decode", "mixed"])
def test_xla_path_with_kv_heads_sharded_across_devices(chunks):
    """Tensor parallelism shards q heads and the pool's kv_heads axis (forced CPU devices, tests/conftest.py)."""
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices")
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]).reshape(1, 2), ("data", "model"))
    batch = make_batch(9, chunks, block_size=8, num_q_heads=6, num_kv_heads=2, kv_dtype="int8")
    shard = functools.partial(jax.sharding.NamedSharding, mesh)
    heads = jax.sharding.PartitionSpec(None, "model", None)
    q = jax.device_put(batch.q, shard(heads))
    cache = LayerKVCache(*(jax.device_put(array, shard(jax.sharding.PartitionSpec(None, None, "model")))
                           for array in vars(batch.cache).values()))
    out = _compiled("xla", None)(q, cache, batch.metadata)
    ref = _compiled("reference", None)(batch.q, batch.cache, batch.metadata)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref))))


def test_attention_override_from_the_environment(monkeypatch):
    from jaxinfer.errors import EngineError
    from jaxinfer.runner.step import attention_implementation

    monkeypatch.delenv("JAXINFER_ATTENTION", raising=False)
    assert attention_implementation(1) is None and attention_implementation(2) == "xla"
    monkeypatch.setenv("JAXINFER_ATTENTION", "xla")
    assert attention_implementation(1) == "xla"
    monkeypatch.setenv("JAXINFER_ATTENTION", "flash")
    with pytest.raises(EngineError, match="JAXINFER_ATTENTION='flash': use xla, pallas"):
        attention_implementation(1)
