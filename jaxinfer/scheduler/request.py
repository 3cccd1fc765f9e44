"""The host-side state of one generated sequence: its tokens, KV progress, block table and status.

A request with `n` samples starts as one `Sequence` (index 0). Its prompt is prefilled once; the
step that computes the last prompt token samples `n` tokens from the same logits (`fanout`), and
the scheduler then forks it into `n` sequences (indices 0..n-1) that share the prompt's KV blocks.

Token ids are Python ints; `token_ids` holds the prompt followed by the generated tokens.
Positions `0 .. num_computed_tokens - 1` have their K/V in the paged cache; `block_table[i]` is the
physical block holding positions `i * block_size .. (i + 1) * block_size - 1`.
"""

from __future__ import annotations

import enum
from typing import Literal

from jaxinfer.sampling_params import SamplingParams

FinishReason = Literal["stop", "length", "abort"]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One output stream of a request (mutable; owned by the scheduler, read by the runner)."""

    def __init__(self, request_id: str, seq_index: int, prompt_token_ids: list[int],
                 sampling_params: SamplingParams, priority: int, arrival_time: float,
                 arrival_order: int):
        self.request_id = request_id
        self.seq_index = seq_index
        self.sampling_params = sampling_params
        self.priority = priority
        self.arrival_time = arrival_time
        # Breaks ties between requests that carry the same arrival_time.
        self.arrival_order = arrival_order
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        # Hash chain of the full token blocks (content only, so it survives preemption).
        self.block_hashes: list[bytes] = []
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        # Why the scheduler itself failed the sequence (e.g. it cannot fit in the KV pool).
        self.error: str | None = None
        # Prompt tokens served by prefix-cache hits at its first admission (usage reporting).
        self.num_cached_tokens = 0
        self.num_preemptions = 0

    @property
    def seq_id(self) -> tuple[str, int]:
        return (self.request_id, self.seq_index)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def fanout(self) -> int:
        """How many tokens its next sample draws: n before the first output token (the fork), else 1."""
        return self.sampling_params.n if self.num_output_tokens == 0 else 1

    @property
    def rank(self) -> tuple:
        """Service order: lower priority value first, then earlier arrival, then sample index."""
        return (self.priority, self.arrival_time, self.arrival_order, self.seq_index)

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(int(token_id))

    def fork(self, seq_index: int) -> Sequence:
        """A sibling with the same tokens and KV progress and no blocks (the block manager shares them)."""
        child = Sequence(self.request_id, seq_index, self.prompt_token_ids, self.sampling_params,
                         self.priority, self.arrival_time, self.arrival_order)
        child.token_ids = list(self.token_ids)
        child.num_computed_tokens = self.num_computed_tokens
        child.block_hashes = list(self.block_hashes)
        child.status = self.status
        child.num_cached_tokens = self.num_cached_tokens
        return child

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}#{self.seq_index}, {self.status.value}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens})")
