"""Host side of a step: turns the scheduled sequences into the numpy arrays of `StepInputs`.

This runs every step on the engine's critical path, so it does O(tokens) numpy work and no
per-token Python loops beyond slicing each sequence's new tokens.
"""

from __future__ import annotations

import numpy as np

from jaxinfer.cache.attention_metadata import AttentionMetadata
from jaxinfer.runner.buckets import Bucket
from jaxinfer.runner.step import StepInputs
from jaxinfer.scheduler.scheduler import ScheduledSequence


def build_step_inputs(chunks: list[ScheduledSequence] | tuple[ScheduledSequence, ...], block_copies: tuple[tuple[int, int], ...], bucket: Bucket,
                      block_size: int, max_blocks_per_seq: int) -> tuple[StepInputs, list[tuple[int, int]]]:
    """Returns the padded step inputs and, per sampled row, (index into chunks, sample index)."""
    T, S = bucket.num_tokens, bucket.num_seqs
    tokens = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    # Padding tokens write into the null block (block 0), which no sequence reads.
    slot_mapping = np.zeros(T, np.int32)
    block_tables = np.zeros((S, max_blocks_per_seq), np.int32)
    seq_lens = np.zeros(S, np.int32)
    query_start_loc = np.zeros(S + 1, np.int32)
    logits_indices = np.zeros(S, np.int32)
    rows: list[tuple[int, int]] = []
    offset = 0
    for i, chunk in enumerate(chunks):
        n, start = chunk.num_new_tokens, chunk.start_position
        pos = np.arange(start, start + n, dtype=np.int32)
        table = np.asarray(chunk.block_table, np.int32)
        tokens[offset:offset + n] = chunk.token_ids
        positions[offset:offset + n] = pos
        slot_mapping[offset:offset + n] = table[pos // block_size] * block_size + pos % block_size
        block_tables[i, :len(table)] = table
        seq_lens[i] = start + n
        offset += n
        query_start_loc[i + 1] = offset
        for sample in range(chunk.num_samples):
            logits_indices[len(rows)] = offset - 1
            rows.append((i, sample))
    query_start_loc[len(chunks) + 1:] = offset
    copies = np.zeros((S, 2), np.int32)
    if block_copies:
        copies[:len(block_copies)] = block_copies
    attention = AttentionMetadata(slot_mapping, block_tables, seq_lens, query_start_loc)
    return StepInputs(tokens, positions, attention, logits_indices, np.int32(len(rows)), copies), rows
