"""What one compiled model step needs to know about the paged KV cache (a pytree of int32 arrays).

The engine runs a flat, ragged batch: the new tokens of every scheduled sequence laid end to end,
`T` tokens in all (padded to a token bucket), from `S` sequences (padded to a sequence bucket).
Sequence `s` owns tokens `query_start_loc[s]:query_start_loc[s+1]` of the flat batch; they are
the last `q_len_s` positions of its context of `seq_lens[s]` tokens, so token `i` of the chunk sits
at position `seq_lens[s] - q_len_s + i` and attends causally to positions `0..` that position.
A 1-token chunk is a decode, a longer one a prefill chunk (chunked prefill mixes both in a step).

Physical block 0 is the *null block*: the block manager never gives it to a sequence. Padding
tokens write their K/V there (slot 0..block_size-1) and padding block-table entries point to it,
so no array needs a -1 sentinel; its contents are garbage and never read under a valid mask.

Fields (all int32):
    slot_mapping     [T]          flat slot `block * block_size + offset` where token t's K/V is written.
    block_tables     [S, B_max]   physical block of each logical block of sequence s (padding: 0).
    seq_lens         [S]          context length of s including this step's tokens (padding seqs: 0).
    query_start_loc  [S + 1]      offsets of each sequence's tokens in the flat batch; non-decreasing;
                                  padding sequences have empty ranges at the end.
"""

from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: jax.Array
    block_tables: jax.Array
    seq_lens: jax.Array
    query_start_loc: jax.Array

    @property
    def num_seqs(self) -> int:
        """The sequence bucket S (static)."""
        return self.block_tables.shape[0]
