"""What the engine reports per request: incremental text and tokens, finish reasons, usage, timings."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class CompletionOutput:
    """One of a request's n samples. `text`/`token_ids` are cumulative; `delta_*` is what this
    step added (what a streaming client sends on)."""

    index: int
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    # Per generated token: {token_id: logprob} for the chosen token and the requested top-N.
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int
    metrics: RequestMetrics
    error: str | None = None

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (vLLM's TPOT), of the longest sample."""
        m, longest = self.metrics, max((len(o.token_ids) for o in self.outputs), default=0)
        if m.first_token_time is None or m.last_token_time is None or longest < 2:
            return None
        return (m.last_token_time - m.first_token_time) / (longest - 1)
