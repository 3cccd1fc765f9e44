"""Per-request sampling parameters, validated on construction.

The defaults match what vLLM users expect: temperature 1.0 (0 means greedy), no top-k (-1),
top-p 1.0, no penalties. A `RequestError` names the bad field and its allowed range. As in vLLM,
a temperature under 1e-5 is greedy and one under 1e-2 is raised to 1e-2 (dividing logits by less
overflows float32), and top_k 0 means disabled, like -1.
"""

from __future__ import annotations

import dataclasses
import math

from jaxinfer.errors import RequestError

# The compiled step returns this many top logprobs per sampled token; requests may ask for fewer.
MAX_LOGPROBS = 20
# vLLM's temperature floors: under GREEDY_TEMPERATURE is greedy, under MIN_TEMPERATURE is raised to it.
GREEDY_TEMPERATURE = 1e-5
MIN_TEMPERATURE = 1e-2


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        _check(self.n >= 1, "n", self.n, "must be >= 1")
        _check(math.isfinite(self.temperature) and self.temperature >= 0, "temperature", self.temperature,
               "must be a finite number >= 0 (0 means greedy)")
        if self.temperature < MIN_TEMPERATURE:
            object.__setattr__(self, "temperature",
                               0.0 if self.temperature < GREEDY_TEMPERATURE else MIN_TEMPERATURE)
        # 2**31: the wire's int32 (jaxinfer.proto); no vocabulary or context comes near it.
        _check(self.top_k in (-1, 0) or 1 <= self.top_k < 2**31, "top_k", self.top_k,
               "must be -1 or 0 (disabled) or in [1, 2**31)")
        if self.top_k == 0:
            object.__setattr__(self, "top_k", -1)
        _check(math.isfinite(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        _check(math.isfinite(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "must be in [0, 1]")
        _check(math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
               self.repetition_penalty, "must be > 0 (1.0 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(math.isfinite(value) and -2 <= value <= 2, name, value, "must be in [-2, 2]")
        _check(1 <= self.max_tokens < 2**31, "max_tokens", self.max_tokens, "must be in [1, 2**31)")
        _check(0 <= self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens,
               "must be between 0 and max_tokens")
        _check(self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs", self.logprobs,
               f"must be between 0 and {MAX_LOGPROBS}")
        _check(self.seed is None or 0 <= self.seed < 2**63, "seed", self.seed, "must be in [0, 2**63)")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "must be non-empty strings")

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def _check(ok: bool, name: str, value, rule: str) -> None:
    if not ok:
        raise RequestError(f"invalid sampling parameter {name}={value!r}: {rule}")
