"""Shape buckets: the fixed (tokens, sequences) shapes the model step is compiled for.

A step of `num_tokens` new tokens from `num_seqs` sequences (and `num_samples` sampled rows,
more than num_seqs when a request with n > 1 fans out) runs at the smallest bucket that holds it:
decode-only steps (every sequence contributes one token) at `(S, S)` from the sequence ladder,
steps with prefill chunks at `(T, min(T, max_num_seqs))` from the token ladder. The ladders end
exactly at `max_num_seqs` and `max_num_batched_tokens`, so no schedulable step lacks a bucket.
They double from their smallest size, each doubling from 8 x `buckets_per_doubling` on (16 for 2)
cut into that many equal steps (configs/engine.yaml says why), which bounds the padding rows a step
computes.

Within a mixed bucket, the LM head and sampling run at the smallest of `Bucket.sampled_row_ladder`
that holds the step's sampled rows (a branch of the compiled step, chosen at run time): a prefill
bucket has max_num_seqs rows for the steps that mix many sequences, but a lone prompt samples one,
and 32 rows of the default model's head and sampling cost 9.2 ms against 1.7 for one row (two cores).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, order=True)
class Bucket:
    num_tokens: int
    num_seqs: int

    @property
    def name(self) -> str:
        return f"t{self.num_tokens}_s{self.num_seqs}"

    @property
    def is_decode(self) -> bool:
        """A row per token: the shape of decode-only steps (a small mixed bucket can share it)."""
        return self.num_tokens == self.num_seqs

    @property
    def sampled_row_ladder(self) -> list[int]:
        """Row counts the step's head and sampling are compiled for: a decode bucket's own rows (its
        ladder is already tight), a mixed bucket's powers of four below its rows, then its rows."""
        if self.is_decode:
            return [self.num_seqs]
        return ladder(1, self.num_seqs, factor=4)


def ladder(smallest: int, largest: int, factor: int = 2, splits: int = 1) -> list[int]:
    """`smallest` times powers of `factor` below `largest`, then `largest` itself. With `splits` > 1,
    each step from a size that is a multiple of 8 x splits up to the next is cut into `splits` equal
    steps (factor 2, splits 2: 8, 16, 24, 32, 48, 64, ...), so that every size stays a multiple of 8."""
    steps, size = [], smallest
    while size < largest:
        step = (factor - 1) * size // splits if size % (8 * splits) == 0 else (factor - 1) * size
        steps.extend(range(size, min(factor * size, largest), step))
        size *= factor
    return steps + [largest]


@dataclasses.dataclass(frozen=True)
class BucketLadder:
    max_num_seqs: int
    max_num_batched_tokens: int
    min_token_bucket: int
    buckets_per_doubling: int

    def __post_init__(self):
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                             f"max_num_seqs ({self.max_num_seqs}): every running sequence needs a token per step")

    @property
    def decode_buckets(self) -> list[Bucket]:
        return [Bucket(s, s) for s in ladder(1, self.max_num_seqs, splits=self.buckets_per_doubling)]

    @property
    def mixed_buckets(self) -> list[Bucket]:
        smallest = min(self.min_token_bucket, self.max_num_batched_tokens)
        return [Bucket(t, min(t, self.max_num_seqs)) for t in ladder(smallest, self.max_num_batched_tokens,
                                                                       splits=self.buckets_per_doubling)]

    @property
    def all_buckets(self) -> list[Bucket]:
        return sorted(set(self.decode_buckets) | set(self.mixed_buckets))

    def select(self, num_tokens: int, num_seqs: int, num_samples: int) -> Bucket:
        rows = max(num_seqs, num_samples)
        # Mixed buckets also catch a decode step whose fan-out outgrows the sequence ladder.
        candidates = (self.decode_buckets if num_tokens == num_seqs else []) + self.mixed_buckets
        for bucket in candidates:
            if bucket.num_tokens >= num_tokens and bucket.num_seqs >= rows:
                return bucket
        raise ValueError(f"no bucket holds {num_tokens} tokens / {rows} rows; the scheduler exceeded its budget")
