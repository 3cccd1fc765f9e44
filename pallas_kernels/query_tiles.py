"""Split a flat ragged batch into query tiles: the unit of work of the ragged paged attention paths.

A query tile is up to `tile_size` consecutive tokens of one sequence; they share that sequence's
paged context, so a tile reads its KV blocks once for all its rows. The tokens after
`query_start_loc[-1]` (batch padding) form one more pseudo-sequence with an empty context, so every
one of the T tokens lies in exactly one tile and every output row gets written (padding rows: zeros).

The number of tiles is bounded statically. Each of the S + 1 groups (sequences and padding) ends in
at most one partial tile; p partial tiles hold at least p tokens and the full ones tile_size each, so
    num_tiles <= min(T, S + 1 + floor((T - S - 1) / tile_size))    (<= S + ceil(T / tile_size)),
reached when every group's length is 1 more than a multiple of tile_size. Tiles past the real count
are empty (`count` 0) and write nothing.

`query_tiles(metadata, num_tokens, tile_size)` returns a `QueryTiles` of int32 arrays:
    seq        [W]  sequence of the tile (row of block_tables; padding tiles use row 0, never read)
    start      [W]  flat index of the tile's first token (0 for empty tiles)
    count      [W]  tokens in the tile (0 for empty tiles)
    first_pos  [W]  context position of the tile's first token
    kv_len     [W]  context positions the tile may read: first_pos + count, 0 for padding tokens
    token_tile [T]  tile of each flat token
    token_row  [T]  row of each flat token inside its tile
Row r of a tile sits at position first_pos + r and attends to positions p <= first_pos + r, p < kv_len.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinfer.cache.attention_metadata import AttentionMetadata


@dataclasses.dataclass(frozen=True)
class QueryTiles:
    seq: jax.Array
    start: jax.Array
    count: jax.Array
    first_pos: jax.Array
    kv_len: jax.Array
    token_tile: jax.Array
    token_row: jax.Array

    @property
    def num_tiles(self) -> int:
        return self.seq.shape[0]


def num_query_tiles(num_tokens: int, num_seqs: int, tile_size: int) -> int:
    """The static tile count W for T tokens of at most S sequences (see the module docstring)."""
    return min(num_tokens, num_seqs + 1 + (num_tokens - num_seqs - 1) // tile_size)


def query_tiles(metadata: AttentionMetadata, num_tokens: int, tile_size: int, *,
                selected: jax.Array | None = None, num_tiles: int | None = None) -> QueryTiles:
    """Tiles of up to tile_size tokens covering the flat batch of num_tokens (traceable).

    With `selected` (bool [S]) only the selected sequences' tokens are tiled: no padding pseudo-sequence,
    and `token_tile`/`token_row` are meaningful for their tokens only. The caller then passes the static
    `num_tiles` bound that holds for its selection.
    """
    num_seqs = metadata.num_seqs
    qsl = metadata.query_start_loc.astype(jnp.int32)
    # Sequence S is the padding pseudo-sequence: tokens qsl[S]..T, no context.
    seq_starts = qsl
    seq_counts = jnp.append(qsl[1:] - qsl[:-1], num_tokens - qsl[-1])
    context_starts = jnp.append(metadata.seq_lens.astype(jnp.int32) - seq_counts[:-1], 0)
    has_context = jnp.arange(num_seqs + 1) < num_seqs
    if selected is not None:
        seq_counts = jnp.where(jnp.append(selected, False), seq_counts, 0)

    tiles_per_seq = -(-seq_counts // tile_size)
    tiles_end = jnp.cumsum(tiles_per_seq)
    tiles_begin = tiles_end - tiles_per_seq

    if num_tiles is None:
        num_tiles = num_query_tiles(num_tokens, num_seqs, tile_size)
    tile_ids = jnp.arange(num_tiles, dtype=jnp.int32)
    # Empty tiles (past the last real one) land on index S + 1; clamp and zero their count.
    tile_seq = jnp.minimum(jnp.searchsorted(tiles_end, tile_ids, side="right"), num_seqs)
    offset = (tile_ids - tiles_begin[tile_seq]) * tile_size
    count = jnp.clip(seq_counts[tile_seq] - offset, 0, tile_size)
    first_pos = jnp.where(has_context[tile_seq], context_starts[tile_seq] + offset, 0)
    kv_len = jnp.where(has_context[tile_seq], first_pos + count, 0)

    token_ids = jnp.arange(num_tokens, dtype=jnp.int32)
    token_seq = jnp.searchsorted(qsl[1:], token_ids, side="right")
    token_offset = token_ids - seq_starts[token_seq]
    return QueryTiles(
        seq=jnp.where(has_context[tile_seq], tile_seq, 0).astype(jnp.int32),
        start=jnp.where(count > 0, seq_starts[tile_seq] + offset, 0).astype(jnp.int32),
        count=count.astype(jnp.int32),
        first_pos=first_pos.astype(jnp.int32),
        kv_len=kv_len.astype(jnp.int32),
        token_tile=(tiles_begin[token_seq] + token_offset // tile_size).astype(jnp.int32),
        token_row=(token_offset % tile_size).astype(jnp.int32),
    )
