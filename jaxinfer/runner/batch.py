"""Host side of a step: turns the scheduled sequences into the numpy arrays of `StepInputs`.

This runs every step on the engine's critical path, so the work per sequence is a few attribute
reads and its slices; the arrays are then built in numpy at once (a loop of small numpy writes per
sequence cost 12 us each, 3 ms a step at batch 256).
"""

from __future__ import annotations

import itertools

import numpy as np

from jaxinfer.cache.attention_metadata import AttentionMetadata
from jaxinfer.runner.buckets import Bucket
from jaxinfer.runner.step import StepInputs
from jaxinfer.scheduler.scheduler import ScheduledSequence


def _spread(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For items laid out end to end, `counts[i]` of them for chunk i: each item's chunk, and its
    index within that chunk."""
    owner = np.repeat(np.arange(len(counts)), counts)
    first = np.cumsum(counts) - counts
    return owner, np.arange(len(owner), dtype=np.int32) - first[owner]


def build_step_inputs(chunks: list[ScheduledSequence] | tuple[ScheduledSequence, ...], block_copies: tuple[tuple[int, int], ...], bucket: Bucket,
                      block_size: int, max_blocks_per_seq: int,
                      num_steps: int = 1) -> tuple[StepInputs, list[tuple[int, int]]]:
    """Returns the padded step inputs and, per sampled row, (index into chunks, sample index).
    `num_steps` > 1 asks a decode bucket for that many steps (see jaxinfer.runner.step)."""
    T, S = bucket.num_tokens, bucket.num_seqs
    num_chunks = len(chunks)
    counts = np.fromiter((c.num_new_tokens for c in chunks), np.int32, num_chunks)
    starts = np.fromiter((c.start_position for c in chunks), np.int32, num_chunks)
    samples = np.fromiter((c.num_samples for c in chunks), np.int32, num_chunks)
    table_lens = np.fromiter((len(c.block_table) for c in chunks), np.int32, num_chunks)
    ends = np.cumsum(counts, dtype=np.int32)
    num_tokens = int(ends[-1]) if num_chunks else 0

    # Block tables, each sequence's row filled from the left (padding entries: the null block).
    block_tables = np.zeros((S, max_blocks_per_seq), np.int32)
    table_rows, table_columns = _spread(table_lens)
    block_tables[table_rows, table_columns] = np.fromiter(
        itertools.chain.from_iterable(c.block_table for c in chunks), np.int32, len(table_rows))

    # The new tokens end to end; padding tokens write into the null block (slot 0), which no
    # sequence reads.
    token_chunk, token_offsets = _spread(counts)
    token_positions = starts[token_chunk] + token_offsets
    tokens = np.zeros(T, np.int32)
    tokens[:num_tokens] = np.fromiter(itertools.chain.from_iterable(c.token_ids for c in chunks), np.int32, num_tokens)
    positions = np.zeros(T, np.int32)
    positions[:num_tokens] = token_positions
    slot_mapping = np.zeros(T, np.int32)
    slot_mapping[:num_tokens] = (block_tables[token_chunk, token_positions // block_size] * block_size
                                 + token_positions % block_size)
    seq_lens = np.zeros(S, np.int32)
    seq_lens[:num_chunks] = starts + counts
    query_start_loc = np.full(S + 1, num_tokens, np.int32)
    query_start_loc[0] = 0
    query_start_loc[1:num_chunks + 1] = ends

    # A chunk that samples k tokens (a fan-out) has k rows on its last token.
    row_chunk, row_sample = _spread(samples)
    logits_indices = np.zeros(S, np.int32)
    logits_indices[:len(row_chunk)] = ends[row_chunk] - 1
    rows = list(zip(row_chunk.tolist(), row_sample.tolist()))
    copies = np.zeros((S, 2), np.int32)
    if block_copies:
        copies[:len(block_copies)] = block_copies
    attention = AttentionMetadata(slot_mapping, block_tables, seq_lens, query_start_loc)
    return StepInputs(tokens, positions, attention, logits_indices, np.int32(len(rows)), copies,
                      np.int32(num_steps)), rows
