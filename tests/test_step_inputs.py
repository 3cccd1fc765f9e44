"""The host's step arrays (jaxinfer.runner.batch.build_step_inputs, built in numpy at once) against a
per-sequence construction written straight from the layout that AttentionMetadata and StepInputs
document, on random mixes of decodes, prefill chunks, fan-outs and chunks that sample nothing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxinfer.runner.batch import build_step_inputs
from jaxinfer.runner.buckets import Bucket
from jaxinfer.scheduler.scheduler import ScheduledSequence

BLOCK_SIZE = 16
MAX_BLOCKS = 12


@dataclasses.dataclass
class FakeSequence:
    """All a ScheduledSequence reads of its sequence here."""
    token_ids: list[int]


def random_step(rng, bucket: Bucket) -> tuple[list[ScheduledSequence], tuple[tuple[int, int], ...]]:
    chunks, num_tokens, num_rows = [], 0, 0
    for _ in range(int(rng.integers(1, bucket.num_seqs + 1))):
        n = 1 if rng.random() < 0.6 else int(rng.integers(2, 20))
        if num_tokens + n > bucket.num_tokens:
            break
        samples = int(rng.choice([0, 1, 1, 2, 3]))
        if num_rows + samples > bucket.num_seqs:
            samples = 0
        start = int(rng.integers(0, 150))
        table = tuple(int(b) for b in rng.permutation(np.arange(1, 500))[:-(-(start + n) // BLOCK_SIZE)])
        chunks.append(ScheduledSequence(FakeSequence(rng.integers(0, 1000, start + n).tolist()), start, n, samples, table))
        num_tokens += n
        num_rows += samples
    copies = tuple(tuple(int(b) for b in pair) for pair in rng.integers(1, 500, (int(rng.integers(0, 3)), 2)))
    return chunks, copies


def expected_inputs(chunks, bucket: Bucket):
    T, S = bucket.num_tokens, bucket.num_seqs
    tokens, positions, slots = np.zeros(T, np.int32), np.zeros(T, np.int32), np.zeros(T, np.int32)
    tables, seq_lens = np.zeros((S, MAX_BLOCKS), np.int32), np.zeros(S, np.int32)
    starts = np.zeros(S + 1, np.int32)
    logits_indices, rows, offset = np.zeros(S, np.int32), [], 0
    for i, chunk in enumerate(chunks):
        tables[i, :len(chunk.block_table)] = chunk.block_table
        seq_lens[i] = chunk.start_position + chunk.num_new_tokens
        for j, token in enumerate(chunk.token_ids):
            position = chunk.start_position + j
            tokens[offset], positions[offset] = token, position
            slots[offset] = chunk.block_table[position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE
            offset += 1
        for sample in range(chunk.num_samples):
            logits_indices[len(rows)] = offset - 1
            rows.append((i, sample))
        starts[i + 1:] = offset
    return tokens, positions, slots, tables, seq_lens, starts, logits_indices, rows


@pytest.mark.parametrize("seed", range(40))
def test_step_inputs_match_a_per_sequence_construction(seed):
    rng = np.random.default_rng(seed)
    bucket = Bucket(int(rng.integers(8, 64)), int(rng.choice([2, 4, 8])))
    chunks, copies = random_step(rng, bucket)
    inputs, rows = build_step_inputs(chunks, copies, bucket, BLOCK_SIZE, MAX_BLOCKS)
    tokens, positions, slots, tables, seq_lens, starts, logits_indices, want_rows = expected_inputs(chunks, bucket)
    got = (inputs.tokens, inputs.positions, inputs.attention.slot_mapping, inputs.attention.block_tables,
           inputs.attention.seq_lens, inputs.attention.query_start_loc, inputs.logits_indices)
    for got_array, want_array in zip(got, (tokens, positions, slots, tables, seq_lens, starts, logits_indices)):
        assert got_array.dtype == np.int32
        np.testing.assert_array_equal(got_array, want_array)
    assert rows == want_rows and int(inputs.num_rows) == len(want_rows)
    want_copies = np.zeros((bucket.num_seqs, 2), np.int32)
    for i, pair in enumerate(copies):
        want_copies[i] = pair
    np.testing.assert_array_equal(inputs.block_copies, want_copies)


def test_an_empty_step_is_all_padding():
    inputs, rows = build_step_inputs((), (), Bucket(16, 4), BLOCK_SIZE, MAX_BLOCKS)
    assert rows == [] and int(inputs.num_rows) == 0
    assert not inputs.tokens.any() and not inputs.attention.block_tables.any() and not inputs.attention.query_start_loc.any()
