"""The XLA (CPU) path of ragged paged attention: query tiles x KV chunks with an online softmax.

    xla_ragged_paged_attention(q [T, num_q_heads, head_dim], cache: LayerKVCache,
                               metadata: AttentionMetadata, *, sm_scale, soft_cap=None)
        -> [T, num_q_heads, head_dim] in q's dtype (semantics: `ragged_paged_attention`).

The batch is cut into query tiles (`query_tiles`): one token per tile for decode batches, up to 64
tokens of one sequence for prefill chunks. A `lax.fori_loop` then walks the KV context in chunks of
128 positions up to the longest tile's context (a dynamic trip count, so short batches do not pay for
the block table's full width): each step gathers the chunk's blocks for every tile ([W, C, kvh, hd],
small enough to stay in cache, dequantized to float32) and folds it into the online softmax. Memory
stays O(W * C) whatever the context length.

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
KV chunks of 64-256 positions timed alike (within noise) for prefill; 128 was best or near it for
decode batches of 8-32, where a chunk's gathered blocks ([W, C, kvh * hd] float32) should stay in cache.
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

# KV positions per loop step, and the largest query tile: measured, see the module docstring.
KV_CHUNK_TOKENS = 128
MAX_QUERY_TILE = 64


def choose_query_tile(num_tokens: int, num_seqs: int) -> int:
    """Tokens per query tile: about the mean tokens per sequence (a power of two, 1..64).

    Decode batches (T <= S + 1) get 1; a long prefill chunk gets 64. Tiles only hold one sequence's
    tokens, so a tile much longer than the typical chunk would compute mostly padding rows.
    """
    mean_tokens = num_tokens // (num_seqs + 1)
    tile = 1
    while tile * 2 <= min(mean_tokens, MAX_QUERY_TILE):
        tile *= 2
    return tile


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
        return jnp.einsum("wkrd,wkcd->wkrc", rows, k)

    def weighted_sum(self, probs: jax.Array, v: jax.Array) -> jax.Array:
        return jnp.einsum("wkrc,wkcd->wkrd", probs, v)

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
        return jnp.einsum("wrf,wcf->wrc", rows, k)

    def weighted_sum(self, probs: jax.Array, v: jax.Array) -> jax.Array:
        return jnp.einsum("wrc,wcf->wrf", probs, v)

    def output(self, rows: jax.Array, tile: int) -> jax.Array:
        tiles = rows.shape[0]
        num_heads = self.num_kv_heads * self.group
        per_kv_head = rows.reshape(tiles, tile, num_heads, self.num_kv_heads, -1)
        own_head = (jnp.arange(num_heads) // self.group)[None, None, :, None, None]
        return jnp.take_along_axis(per_kv_head, own_head, axis=3)[:, :, :, 0]


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
    tile = choose_query_tile(num_tokens, metadata.num_seqs)
    tiles = query_tiles(metadata, num_tokens, tile)
    layout = (_BlockDiagonalHeads if tile == 1 else _GroupedHeads)(cache.num_kv_heads, num_heads // cache.num_kv_heads)
    token_rows = jnp.minimum(tiles.start[:, None] + jnp.arange(tile), num_tokens - 1)
    rows = layout.query_rows(q.astype(jnp.float32)[token_rows] * sm_scale)

    blocks_per_chunk = max(1, min(KV_CHUNK_TOKENS // cache.block_size, metadata.block_tables.shape[1]))
    chunk = blocks_per_chunk * cache.block_size
    step = _chunk_step(cache, metadata.block_tables, tiles, tile, blocks_per_chunk, layout, rows, soft_cap)
    state = jax.lax.fori_loop(0, -(-jnp.max(tiles.kv_len) // chunk), step,
                              online_softmax.initial_state(rows.shape[:-1], layout.value_width(cache.head_dim)))
    out_tiles = layout.output(online_softmax.finish(state), tile)
    return out_tiles[tiles.token_tile, tiles.token_row].astype(q.dtype)


def _chunk_step(cache: LayerKVCache, block_tables: jax.Array, tiles: QueryTiles, tile: int,
                blocks_per_chunk: int, layout, rows: jax.Array, soft_cap: float | None):
    """The fori_loop body folding KV chunk `index` (blocks_per_chunk blocks) of every tile into the state."""
    chunk = blocks_per_chunk * cache.block_size
    # Whole chunks only: a dynamic_slice running past the table's end would be shifted back, not cut.
    padded_width = -(-block_tables.shape[1] // blocks_per_chunk) * blocks_per_chunk
    tile_tables = jnp.pad(block_tables, ((0, 0), (0, padded_width - block_tables.shape[1])))[tiles.seq]
    row_pos = tiles.first_pos[:, None] + jnp.arange(tile)

    def gather(pool: jax.Array, scale: jax.Array | None, blocks: jax.Array) -> jax.Array:
        values = dequantize_kv(pool[blocks], None if scale is None else scale[blocks])
        return values.reshape(blocks.shape[0], chunk, cache.num_kv_heads, cache.head_dim)

    def step(index, state):
        blocks = jax.lax.dynamic_slice_in_dim(tile_tables, index * blocks_per_chunk, blocks_per_chunk, axis=1)
        kv_pos = index * chunk + jnp.arange(chunk)
        in_context = kv_pos[None, :] < tiles.kv_len[:, None]
        causal = (kv_pos[None, None, :] <= row_pos[:, :, None]) & in_context[:, None, :]
        k = layout.kv(gather(cache.k, cache.k_scale, blocks))
        v = layout.kv(jnp.where(in_context[:, :, None, None], gather(cache.v, cache.v_scale, blocks), 0.0))
        logits = online_softmax.cap_logits(layout.logits(rows, k), soft_cap)
        return online_softmax.online_softmax_step(state, logits, layout.row_mask(causal), v, layout.weighted_sum)

    return step
