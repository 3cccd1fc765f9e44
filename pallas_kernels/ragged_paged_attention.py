"""Ragged paged attention: the Pallas GPU kernel, its pure-JAX reference, and the dispatcher.

    ragged_paged_attention(q [T, num_q_heads, head_dim], cache: LayerKVCache, metadata: AttentionMetadata,
                           *, sm_scale: float, soft_cap: float | None = None,
                           implementation: str | None = None) -> [T, num_q_heads, head_dim] in q's dtype

The flat batch of T tokens (padded) comes from S sequences (padded); `metadata` says which tokens
belong to which sequence and where its K/V blocks lie (`jaxinfer.cache.attention_metadata`). Token i
of sequence s's chunk sits at position p = seq_lens[s] - q_len_s + i and attends to positions 0..p of
s: its paged prefix and its own chunk up to itself, so write the step's K/V into the pool
(`jaxinfer.cache.kv_pool.write_kv`) before calling this. A 1-token chunk is a decode; decodes and
prefill chunks mix freely in one call.

- GQA/MQA: query head h reads kv head h // (num_q_heads // num_kv_heads).
- logits = sm_scale * q.k, then soft_cap * tanh(logits / soft_cap) when soft_cap is given; softmax in
  float32. K/V stored as int8/fp8 are dequantized with their per-token-per-head scales in the kernel.
- Rows of padding tokens (index >= query_start_loc[-1]) are zeros. Masking is by `jnp.where`, never a
  multiply, so whatever unused or null blocks hold (NaN included) never reaches the result.
- Tensor parallelism: heads are independent, so run this inside `jax.shard_map` with q's head axis and
  the pool's kv_heads axis sharded alike and the metadata replicated. GSPMD does not partition a
  pallas_call (it would gather the whole pool onto every device), and the XLA decode layout contracts
  across kv heads (all-reduces); under shard_map both stay local.

`implementation`:
    None         the backend's choice: "pallas" on GPU, "cpu" on a CPU the C++ kernel serves, "xla"
                 elsewhere (never interpret mode). Under GSPMD tensor parallelism pass "xla": a
                 custom call is not partitioned (its operands would be gathered onto every device).
    "pallas"     the Pallas kernel through the Triton lowering (sm80+; fp8 storage likely needs sm89+,
                 where Triton converts e4m3 natively; unverified, no GPU was available).
    "cpu"        the C++ kernel of `cpu_paged_attention` (x86-64 with AVX2/FMA), decodes and prefill
                 chunks alike: what serves on CPU with one device.
    "xla"        the XLA path of `ragged_paged_attention_xla`, all in XLA operations.
    "interpret"  the Pallas kernel in Pallas interpret mode: for tests on CPU only (5-60x slower).
    "reference"  `reference_ragged_paged_attention`, dense and simple: the oracle of the tests.

The Pallas kernel: grid (query tile, kv head). A program loads its tile's query rows for one kv head
(tile tokens x the head's query group, padded to a power of two), then walks the sequence's blocks
through the block table, 64 KV positions per step, up to the tile's last position, with an online
softmax; rows past the tile's token count are masked out of the store. It has been checked in
interpret mode and by lowering it to Triton IR on CPU (tests), not run on a GPU: none was available.
jax deprecates the Triton lowering in favour of Mosaic GPU; a Hopper kernel would be added beside
this one under its own implementation name.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jaxinfer.cache.attention_metadata import AttentionMetadata
from jaxinfer.cache.kv_pool import LayerKVCache, dequantize_kv
from pallas_kernels import cpu_paged_attention, online_softmax
from pallas_kernels.query_tiles import query_tiles
from pallas_kernels.ragged_paged_attention_xla import xla_ragged_paged_attention

IMPLEMENTATIONS = ("pallas", "cpu", "xla", "interpret", "reference")
# KV positions per kernel step, and query rows per program for decode / prefill batches. Triton's dot
# wants every dimension >= 16.
PALLAS_KV_STEP = 64
PALLAS_DECODE_ROWS = 16
PALLAS_PREFILL_ROWS = 64
# Triton lowers float32 dots at default precision to TF32 (about 1e-3 relative error); ask for IEEE.
_DOT_PRECISION = jax.lax.Precision.HIGHEST


def default_implementation(cache: LayerKVCache, backend: str | None = None) -> str:
    """"pallas" on GPU; on CPU "cpu" where the C++ kernel serves `cache`, else "xla" (CPU
    runs Pallas only in interpret mode)."""
    backend = backend or jax.default_backend()
    if backend == "gpu":
        return "pallas"
    return "cpu" if backend == "cpu" and cpu_paged_attention.serves(cache) else "xla"


def ragged_paged_attention(q: jax.Array, cache: LayerKVCache, metadata: AttentionMetadata, *, sm_scale: float,
                           soft_cap: float | None = None, implementation: str | None = None) -> jax.Array:
    """See the module docstring."""
    _check_inputs(q, cache, metadata, soft_cap)
    implementation = implementation or default_implementation(cache)
    if implementation == "xla":
        return xla_ragged_paged_attention(q, cache, metadata, sm_scale=sm_scale, soft_cap=soft_cap)
    if implementation == "cpu":
        if not cpu_paged_attention.serves(cache):
            raise ValueError("the 'cpu' implementation needs the C++ attention kernel, which cannot run here (it "
                             f"needs an x86-64 CPU with AVX2/FMA, g++ and a head_dim that is a multiple of "
                             f"{cpu_paged_attention.HEAD_DIM_MULTIPLE}; got {cache.head_dim}): use 'xla'")
        # As in the XLA path (see there): the barrier lets write_kv's update of the pool happen in place.
        cache = jax.lax.optimization_barrier(cache)
        scaled_q = q.astype(jnp.float32) * sm_scale
        return cpu_paged_attention.paged_attention(scaled_q, cache, metadata, soft_cap).astype(q.dtype)
    if implementation == "reference":
        return reference_ragged_paged_attention(q, cache, metadata, sm_scale=sm_scale, soft_cap=soft_cap)
    if implementation == "interpret":
        return pallas_ragged_paged_attention(q, cache, metadata, sm_scale=sm_scale, soft_cap=soft_cap,
                                             interpret=True)
    if implementation == "pallas":
        if jax.default_backend() != "gpu":
            raise ValueError(f"the 'pallas' implementation compiles for GPU only; this backend is "
                             f"{jax.default_backend()!r}: use 'xla' (or None to let the backend choose)")
        return pallas_ragged_paged_attention(q, cache, metadata, sm_scale=sm_scale, soft_cap=soft_cap)
    raise ValueError(f"unknown attention implementation {implementation!r}: choose one of {IMPLEMENTATIONS}")


def _check_inputs(q: jax.Array, cache: LayerKVCache, metadata: AttentionMetadata, soft_cap: float | None):
    num_seqs = metadata.num_seqs
    if q.ndim != 3 or q.shape[2] != cache.head_dim or q.shape[1] % cache.num_kv_heads:
        raise ValueError(f"q must be [T, num_q_heads, head_dim] with head_dim {cache.head_dim} (the pool's) and "
                         f"num_q_heads a multiple of num_kv_heads {cache.num_kv_heads}; got {q.shape}")
    expected = {"slot_mapping": (q.shape[0],), "seq_lens": (num_seqs,), "query_start_loc": (num_seqs + 1,)}
    for name, shape in expected.items():
        if getattr(metadata, name).shape != shape:
            raise ValueError(f"metadata.{name} must have shape {shape} for T={q.shape[0]} tokens and S={num_seqs} "
                             f"sequences; got {getattr(metadata, name).shape}")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap must be None or > 0; got {soft_cap}")


def reference_ragged_paged_attention(q: jax.Array, cache: LayerKVCache, metadata: AttentionMetadata, *,
                                     sm_scale: float, soft_cap: float | None = None) -> jax.Array:
    """Dense oracle: every token gathers its sequence's whole block table, [T, B_max * block_size, ...]."""
    num_tokens, num_heads, head_dim = q.shape
    group = num_heads // cache.num_kv_heads
    starts = metadata.query_start_loc
    tokens = jnp.arange(num_tokens)
    seq = jnp.clip(jnp.searchsorted(starts, tokens, side="right") - 1, 0, metadata.num_seqs - 1)
    is_real = tokens < starts[-1]
    position = metadata.seq_lens[seq] - (starts[seq + 1] - starts[seq]) + (tokens - starts[seq])

    blocks = metadata.block_tables[seq]
    context = blocks.shape[1] * cache.block_size
    k, v = (dequantize_kv(pool[blocks], None if scale is None else scale[blocks])
            .reshape(num_tokens, context, cache.num_kv_heads, head_dim)
            for pool, scale in ((cache.k, cache.k_scale), (cache.v, cache.v_scale)))
    visible = (jnp.arange(context)[None, :] <= position[:, None]) & is_real[:, None]

    grouped_q = q.astype(jnp.float32).reshape(num_tokens, cache.num_kv_heads, group, head_dim)
    # HIGHEST: float32 stays float32 on a GPU too (its default is TF32, ~3e-4 relative error).
    logits = jnp.einsum("tkgd,tckd->tkgc", grouped_q, k, precision=_DOT_PRECISION) * sm_scale
    if soft_cap is not None:  # written out, not shared with the kernels, so that the oracle stays independent
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    probs = jax.nn.softmax(jnp.where(visible[:, None, None, :], logits, -jnp.inf), axis=-1)
    out = jnp.einsum("tkgc,tckd->tkgd", probs, jnp.where(visible[:, :, None, None], v, 0.0), precision=_DOT_PRECISION)
    return jnp.where(is_real[:, None, None], out.reshape(q.shape), 0.0).astype(q.dtype)


def pallas_ragged_paged_attention(q: jax.Array, cache: LayerKVCache, metadata: AttentionMetadata, *,
                                  sm_scale: float, soft_cap: float | None = None,
                                  interpret: bool = False) -> jax.Array:
    """The Pallas kernel (module docstring); interpret=True runs it in Pallas interpret mode."""
    num_tokens, num_heads, head_dim = q.shape
    kv_heads, block_size = cache.num_kv_heads, cache.block_size
    group = num_heads // kv_heads
    group_pad = pl.next_power_of_2(group)
    if head_dim & (head_dim - 1) or block_size & (block_size - 1):
        raise ValueError(f"the Pallas kernel needs power-of-two head_dim and block_size (Triton blocks); got "
                         f"head_dim {head_dim}, block_size {block_size}: use the 'xla' implementation")
    rows = PALLAS_DECODE_ROWS if num_tokens <= metadata.num_seqs + 1 else PALLAS_PREFILL_ROWS
    tile = max(1, rows // group_pad)
    tiles = query_tiles(metadata, num_tokens, tile)

    pages_per_step = max(1, PALLAS_KV_STEP // block_size)
    table = metadata.block_tables
    padded_width = -(-table.shape[1] // pages_per_step) * pages_per_step
    table = jnp.pad(table, ((0, 0), (0, padded_width - table.shape[1])))
    # Query rows per kv head: token-major, the head's group padded to group_pad, and `tile` spare
    # tokens at the end so that every tile's row window lies inside the array.
    grouped = jnp.pad(q.reshape(num_tokens, kv_heads, group, head_dim),
                      ((0, tile), (0, 0), (0, group_pad - group), (0, 0)))
    q_rows = grouped.transpose(1, 0, 2, 3).reshape(kv_heads, (num_tokens + tile) * group_pad, head_dim)
    scales = (cache.k_scale, cache.v_scale) if cache.quantized else ()

    kernel = functools.partial(_attention_kernel, tile_rows=tile * group_pad, group_pad=group_pad,
                               pages_per_step=pages_per_step, sm_scale=sm_scale, soft_cap=soft_cap,
                               quantized=cache.quantized)
    out_rows = pl.pallas_call(
        kernel,
        grid=(tiles.num_tiles, kv_heads),
        out_shape=jax.ShapeDtypeStruct(q_rows.shape, q.dtype),
        interpret=interpret,
        name="ragged_paged_attention",
    )(tiles.seq, tiles.start, tiles.count, tiles.first_pos, tiles.kv_len, table, q_rows, cache.k, cache.v, *scales)
    out = out_rows.reshape(kv_heads, num_tokens + tile, group_pad, head_dim)[:, :num_tokens, :group]
    return out.transpose(1, 0, 2, 3).reshape(q.shape)


def _attention_kernel(seq_ref, start_ref, count_ref, first_pos_ref, kv_len_ref, table_ref, q_ref, k_ref, v_ref,
                      *scale_and_out_refs, tile_rows: int, group_pad: int, pages_per_step: int, sm_scale: float,
                      soft_cap: float | None, quantized: bool):
    """One (query tile, kv head) program: q rows [tile_rows, hd] against the tile's paged context."""
    *scale_refs, out_ref = scale_and_out_refs
    k_scale_ref, v_scale_ref = scale_refs if quantized else (None, None)
    tile_index, head = pl.program_id(0), pl.program_id(1)
    seq, kv_len = seq_ref[tile_index], kv_len_ref[tile_index]
    row_start = start_ref[tile_index] * group_pad
    head_dim = q_ref.shape[2]
    step_tokens = pages_per_step * k_ref.shape[1]
    # bf16 queries take bf16 dots with float32 accumulation (tensor cores); float32 stays float32.
    compute_dtype = q_ref.dtype if q_ref.dtype == jnp.bfloat16 else jnp.float32

    q = q_ref[head, pl.ds(row_start, tile_rows), :].astype(compute_dtype)
    row_token = jax.lax.broadcasted_iota(jnp.int32, (tile_rows,), 0) // group_pad
    row_pos = first_pos_ref[tile_index] + row_token

    def load(pool_ref, scale_ref, pages):
        values = pool_ref[pages, :, head, :].reshape(step_tokens, head_dim)
        scale = None if scale_ref is None else scale_ref[pages, :, head].reshape(step_tokens)
        return dequantize_kv(values, scale)

    def weighted_sum(probs, v):
        return jnp.dot(probs.astype(compute_dtype), v.astype(compute_dtype), precision=_DOT_PRECISION,
                       preferred_element_type=jnp.float32)

    def step(index, state):
        pages = table_ref[seq, pl.ds(index * pages_per_step, pages_per_step)]
        kv_pos = index * step_tokens + jax.lax.broadcasted_iota(jnp.int32, (step_tokens,), 0)
        in_context = kv_pos < kv_len
        visible = (kv_pos[None, :] <= row_pos[:, None]) & in_context[None, :]
        k = load(k_ref, k_scale_ref, pages).astype(compute_dtype)
        v = jnp.where(in_context[:, None], load(v_ref, v_scale_ref, pages), 0.0)
        logits = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=_DOT_PRECISION,
                                     preferred_element_type=jnp.float32)
        logits = online_softmax.cap_logits(logits * sm_scale, soft_cap)
        return online_softmax.online_softmax_step(state, logits, visible, v, weighted_sum)

    num_steps = (kv_len + step_tokens - 1) // step_tokens
    state = jax.lax.fori_loop(0, num_steps, step, online_softmax.initial_state((tile_rows,), head_dim))
    row_written = jnp.broadcast_to((row_token < count_ref[tile_index])[:, None], (tile_rows, head_dim))
    plt.store(out_ref.at[head, pl.ds(row_start, tile_rows), :], online_softmax.finish(state).astype(out_ref.dtype),
              mask=row_written)
