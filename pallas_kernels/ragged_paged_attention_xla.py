"""The XLA (CPU) path of ragged paged attention: a work list of (query tile, KV chunk) pairs.

    xla_ragged_paged_attention(q [T, num_q_heads, head_dim], cache: LayerKVCache,
                               metadata: AttentionMetadata, *, sm_scale, soft_cap=None)
        -> [T, num_q_heads, head_dim] in q's dtype (semantics: `ragged_paged_attention`).

The batch is cut into query tiles (`query_tiles`) twice: the decodes (1-token chunks) into one-token
tiles, the prefill chunks (>= 2 tokens) into tiles of PREFILL_QUERY_TILE tokens of one sequence, so
a step that mixes a long prefill chunk with many decodes gives each its own shape. Each tile needs
ceil(kv_len / 128) KV chunks of 128 positions; every (tile, chunk) pair is one work item, and a
`lax.fori_loop` with a dynamic trip count takes the items a few at a time: it gathers their chunks'
blocks ([items, C, kvh, hd], dequantized to float32), computes each item's softmax over its chunk, and
merges the partial softmaxes into their tiles' states (`online_softmax.merge_partials`). The work is
what the contexts need, not tiles x the batch's longest context: for a 256-token step mixing a
230-token chunk with 25 decodes at contexts of 16-768, that is 6.7 ms per layer instead of 14 ms when
every tile walked to the longest context (one-off timings, 9/3 heads, block 16, float32).

One-device CPU engines run the C++ kernel of `cpu_paged_attention` instead (the "cpu"
implementation); this path serves meshes of several devices and CPUs that kernel does not run on.

Two layouts of the per-step products, chosen by tile size from one-off interleaved timings on the
project's 2-core CPU (9/3/64 heads, block 16, float32; benchmarks/bench_paged_attention.py times the
chosen path):
- one-token tiles (decode): every query head against all kv heads' concatenated features, with the
  other heads' features zeroed in q ("block-diagonal" q). Three times the flops of grouped heads for
  9/3 heads, but the gathered blocks are used as they lie, without a transpose, and each dot has 9
  rows instead of 3 (few-row matmuls are slow on XLA:CPU): 1.2-1.6x faster than grouped heads for
  batches of 8-32 at contexts of 512-2048 (an elementwise multiply-and-reduce form was in between).
  Under GSPMD tensor parallelism its contraction spans the sharded kv_heads axis, so XLA adds
  all-reduces (correct, but slower); under `shard_map` over kv_heads every shard stays local.
- longer tiles (prefill): kv heads as a batch axis, each with its group of query heads ("grouped");
  1.5-5x faster than block-diagonal there, where flops dominate.
KV chunks of 64-256 positions, prefill tiles of 16-64 tokens and 2-32 work items per loop step all timed
alike (within noise) on decode, prefill and mixed steps; 128 positions, 32 tokens, 16 decode and 4
prefill items per step are the middle of that range, capped at the number of tiles.
Storage dtypes on CPU: bf16 and int8 pools decode about as fast as float32 ones or faster; fp8 is
slower (XLA:CPU converts e4m3 to float32 at about 1 ns per element), so prefer int8 for a CPU KV cache.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinfer.cache.attention_metadata import AttentionMetadata
from jaxinfer.cache.kv_pool import LayerKVCache, dequantize_kv
from pallas_kernels import online_softmax
from pallas_kernels.query_tiles import QueryTiles, query_tiles

# KV positions per work item, query tokens per prefill tile, and work items per loop step: measured,
# see the module docstring.
KV_CHUNK_TOKENS = 128
PREFILL_QUERY_TILE = 32
DECODE_PAIRS_PER_STEP = 16
PREFILL_PAIRS_PER_STEP = 4


def _precision(operand: jax.Array) -> jax.lax.Precision | None:
    """float32 dots stay float32 (a GPU's default precision for them is TF32, ~3e-4 relative error);
    bf16 ones keep the default, bf16 products with float32 accumulation."""
    return jax.lax.Precision.HIGHEST if operand.dtype == jnp.float32 else None


@dataclasses.dataclass(frozen=True)
class _GroupedHeads:
    """kv heads as a batch axis: q rows [W, kvh, Tq * group, hd] against k [W, kvh, C, hd]."""

    num_kv_heads: int
    group: int

    def value_width(self, head_dim: int) -> int:
        return head_dim

    def query_rows(self, q_tiles: jax.Array) -> jax.Array:
        tiles, tile, _, head_dim = q_tiles.shape
        grouped = q_tiles.reshape(tiles, tile, self.num_kv_heads, self.group, head_dim)
        return grouped.transpose(0, 2, 1, 3, 4).reshape(tiles, self.num_kv_heads, tile * self.group, head_dim)

    def kv(self, x: jax.Array) -> jax.Array:
        return x.transpose(0, 2, 1, 3)

    def row_mask(self, mask: jax.Array) -> jax.Array:
        tiles, tile, chunk = mask.shape
        expanded = jnp.broadcast_to(mask[:, None, :, None, :], (tiles, self.num_kv_heads, tile, self.group, chunk))
        return expanded.reshape(tiles, self.num_kv_heads, tile * self.group, chunk)

    def logits(self, rows: jax.Array, k: jax.Array) -> jax.Array:
        return jnp.einsum("wkrd,wkcd->wkrc", rows, k, precision=_precision(rows))

    def weighted_sum(self, probs: jax.Array, v: jax.Array) -> jax.Array:
        return jnp.einsum("wkrc,wkcd->wkrd", probs, v, precision=_precision(v))

    def output(self, rows: jax.Array, tile: int) -> jax.Array:
        tiles, _, _, head_dim = rows.shape
        grouped = rows.reshape(tiles, self.num_kv_heads, tile, self.group, head_dim)
        return grouped.transpose(0, 2, 1, 3, 4).reshape(tiles, tile, self.num_kv_heads * self.group, head_dim)


@dataclasses.dataclass(frozen=True)
class _BlockDiagonalHeads:
    """q rows [W, Tq * nq, kvh * hd], zero outside the row's own kv head, against k [W, C, kvh * hd]."""

    num_kv_heads: int
    group: int

    def value_width(self, head_dim: int) -> int:
        return self.num_kv_heads * head_dim

    def query_rows(self, q_tiles: jax.Array) -> jax.Array:
        tiles, tile, num_heads, head_dim = q_tiles.shape
        own_head = (jnp.arange(num_heads) // self.group)[:, None] == jnp.arange(self.num_kv_heads)[None, :]
        spread = jnp.where(own_head[:, :, None], q_tiles[:, :, :, None, :], 0.0)
        return spread.reshape(tiles, tile * num_heads, self.num_kv_heads * head_dim)

    def kv(self, x: jax.Array) -> jax.Array:
        tiles, chunk, kv_heads, head_dim = x.shape
        return x.reshape(tiles, chunk, kv_heads * head_dim)

    def row_mask(self, mask: jax.Array) -> jax.Array:
        tiles, tile, chunk = mask.shape
        num_heads = self.num_kv_heads * self.group
        return jnp.broadcast_to(mask[:, :, None, :], (tiles, tile, num_heads, chunk)).reshape(tiles, -1, chunk)

    def logits(self, rows: jax.Array, k: jax.Array) -> jax.Array:
        return jnp.einsum("wrf,wcf->wrc", rows, k, precision=_precision(rows))

    def weighted_sum(self, probs: jax.Array, v: jax.Array) -> jax.Array:
        return jnp.einsum("wrc,wcf->wrf", probs, v, precision=_precision(v))

    def output(self, rows: jax.Array, tile: int) -> jax.Array:
        tiles = rows.shape[0]
        num_heads = self.num_kv_heads * self.group
        per_kv_head = rows.reshape(tiles, tile, num_heads, self.num_kv_heads, -1)
        own_head = (jnp.arange(num_heads) // self.group)[None, None, :, None, None]
        return jnp.take_along_axis(per_kv_head, own_head, axis=3)[:, :, :, 0]


def split_tile_bounds(num_tokens: int, num_seqs: int) -> tuple[int, int]:
    """Static tile counts for T tokens of S sequences: one-token tiles of the decodes, and
    PREFILL_QUERY_TILE-token tiles of the chunks of >= 2 tokens (n <= min(S, T // 2) such chunks, holding
    c_i tokens, need sum ceil(c_i / tile) <= n + (T - n) // tile tiles, nondecreasing in n)."""
    prefill_seqs = min(num_seqs, num_tokens // 2)
    return min(num_tokens, num_seqs), prefill_seqs + (num_tokens - prefill_seqs) // PREFILL_QUERY_TILE


def xla_ragged_paged_attention(q: jax.Array, cache: LayerKVCache, metadata: AttentionMetadata, *,
                               sm_scale: float, soft_cap: float | None = None) -> jax.Array:
    """See the module docstring; arguments as `ragged_paged_attention`, already checked."""
    # The pool usually arrives fresh from `write_kv`, whose one-token scatter XLA lowers to a
    # dynamic-update-slice. Without a barrier XLA's fusion duplicates that update into the block
    # gather below (the gather then reads the pool as it was *before* the write and redoes the
    # update itself), so the real in-place update must wait for a reader of the old buffer and
    # copy-insertion copies the whole donated pool instead: temp memory = the V pools, decode
    # time growing with the pool size. The barrier makes the gathers read the written pool,
    # which XLA then updates in place.
    cache = jax.lax.optimization_barrier(cache)
    num_tokens, num_heads, _ = q.shape
    num_seqs, group = metadata.num_seqs, num_heads // cache.num_kv_heads
    q_lens = metadata.query_start_loc[1:] - metadata.query_start_loc[:-1]
    scaled_q = q.astype(jnp.float32) * sm_scale

    token_seq = jnp.searchsorted(metadata.query_start_loc[1:], jnp.arange(num_tokens), side="right")

    def tokens_of(selected: jax.Array) -> jax.Array:
        """[T, 1, 1] bool: the token belongs to a selected sequence (batch padding never does)."""
        return jnp.append(selected, False)[token_seq][:, None, None]

    # Each pass's output is kept only for its own tokens: the rows of the others are not its to write.
    num_decode_tiles, num_prefill_tiles = split_tile_bounds(num_tokens, num_seqs)
    is_decode = q_lens == 1
    decode_tiles = query_tiles(metadata, num_tokens, 1, selected=is_decode, num_tiles=num_decode_tiles)
    out = jnp.where(tokens_of(is_decode), _attend_tiles(
        scaled_q, cache, metadata.block_tables, decode_tiles, 1, _BlockDiagonalHeads(cache.num_kv_heads, group),
        DECODE_PAIRS_PER_STEP, soft_cap), 0.0)
    if num_tokens == num_seqs:  # a decode bucket: no sequence can have two tokens
        return out.astype(q.dtype)

    is_prefill = q_lens > 1
    prefill_tiles = query_tiles(metadata, num_tokens, PREFILL_QUERY_TILE, selected=is_prefill,
                                num_tiles=num_prefill_tiles)
    return jnp.where(tokens_of(is_prefill), _attend_tiles(
        scaled_q, cache, metadata.block_tables, prefill_tiles, PREFILL_QUERY_TILE,
        _GroupedHeads(cache.num_kv_heads, group), PREFILL_PAIRS_PER_STEP, soft_cap), out).astype(q.dtype)


def _attend_tiles(scaled_q: jax.Array, cache: LayerKVCache, block_tables: jax.Array, tiles: QueryTiles, tile: int,
                  layout, pairs_per_step: int, soft_cap: float | None) -> jax.Array:
    """Attention of the tokens `tiles` covers -> [T, heads, head_dim] f32 (other tokens' rows: unspecified).

    The work list is every (tile, KV chunk) pair the tiles' contexts need, tile-major; a loop with a
    dynamic trip count folds `pairs_per_step` pairs per step into the tiles' softmax states.
    """
    num_tokens = scaled_q.shape[0]
    token_rows = jnp.minimum(tiles.start[:, None] + jnp.arange(tile), num_tokens - 1)
    rows = layout.query_rows(scaled_q[token_rows])
    row_pos = tiles.first_pos[:, None] + jnp.arange(tile)

    blocks_per_chunk = max(1, min(KV_CHUNK_TOKENS // cache.block_size, block_tables.shape[1]))
    chunk = blocks_per_chunk * cache.block_size
    # Whole chunks only: a dynamic index running past the table's end would be clamped, not cut.
    padded_width = -(-block_tables.shape[1] // blocks_per_chunk) * blocks_per_chunk
    chunk_tables = jnp.pad(block_tables, ((0, 0), (0, padded_width - block_tables.shape[1]))).reshape(
        block_tables.shape[0], -1, blocks_per_chunk)
    chunks_per_tile = -(-tiles.kv_len // chunk)
    pairs_end = jnp.cumsum(chunks_per_tile)
    num_pairs = pairs_end[-1]
    # More items per step than tiles would mostly gather padding: a batch-1 decode step at a 50-token
    # context took 94 us with one item per step and 318 us with 16.
    pairs_per_step = min(pairs_per_step, tiles.num_tiles)

    def gather(pool: jax.Array, scale: jax.Array | None, blocks: jax.Array) -> jax.Array:
        values = dequantize_kv(pool[blocks], None if scale is None else scale[blocks])
        return values.reshape(blocks.shape[0], chunk, cache.num_kv_heads, cache.head_dim)

    def step(index, state):
        pair = index * pairs_per_step + jnp.arange(pairs_per_step)
        pair_tile = jnp.minimum(jnp.searchsorted(pairs_end, pair, side="right"), tiles.num_tiles - 1)
        pair_chunk = pair - (pairs_end - chunks_per_tile)[pair_tile]
        blocks = chunk_tables[tiles.seq[pair_tile], jnp.minimum(pair_chunk, chunk_tables.shape[1] - 1)]
        kv_pos = pair_chunk[:, None] * chunk + jnp.arange(chunk)
        in_context = (kv_pos < tiles.kv_len[pair_tile][:, None]) & (pair < num_pairs)[:, None]
        causal = (kv_pos[:, None, :] <= row_pos[pair_tile][:, :, None]) & in_context[:, None, :]
        k = layout.kv(gather(cache.k, cache.k_scale, blocks))
        v = layout.kv(jnp.where(in_context[:, :, None, None], gather(cache.v, cache.v_scale, blocks), 0.0))
        logits = online_softmax.cap_logits(layout.logits(rows[pair_tile], k), soft_cap)
        partials = online_softmax.chunk_softmax(logits, layout.row_mask(causal), v, layout.weighted_sum)
        return online_softmax.merge_partials(state, pair_tile, partials)

    state = jax.lax.fori_loop(0, -(-num_pairs // pairs_per_step), step,
                              online_softmax.initial_state(rows.shape[:-1], layout.value_width(cache.head_dim)))
    out_tiles = layout.output(online_softmax.finish(state), tile)
    return out_tiles[tiles.token_tile, tiles.token_row]
