"""Request timing records and the serving metrics of the field (vLLM `bench serve` conventions).

Per request: TTFT = first token time - arrival; E2E latency = last token time - arrival;
TPOT = (E2E - TTFT) / (output tokens - 1); ITL = the gaps between consecutive streamed chunks.
Per run: the prefix cache hit rate is the share of prompt tokens the cache served.
Summaries give mean, median, p90 and p99 (linear-interpolated percentiles); goodput counts the
requests per second that met every SLO. A request the server refused or broke off (`error` set), or
one that never got a token, is counted as failed and left out of every figure but the failure count
and the SLO attainment (the share of all requests sent that met every SLO), as vLLM's `bench serve` does.
Times are float seconds on one monotonic clock.
"""

from __future__ import annotations

import collections
import dataclasses
import re

import numpy as np

from jaxinfer.errors import RequestError

PERCENTILES = (50, 90, 99)
SLO_METRICS = ("ttft", "tpot", "e2e")


@dataclasses.dataclass
class RequestTiming:
    """One finished request: when it arrived, and when each chunk of its output came back
    (`chunk_times[i]` delivered `chunk_tokens[i]` tokens), how many of its prompt tokens the
    prefix cache served, or why it failed."""

    arrival: float
    num_prompt_tokens: int
    chunk_times: list[float] = dataclasses.field(default_factory=list)
    chunk_tokens: list[int] = dataclasses.field(default_factory=list)
    num_cached_tokens: int = 0
    error: str | None = None

    def add_chunk(self, time: float, num_tokens: int) -> None:
        if num_tokens:
            self.chunk_times.append(time)
            self.chunk_tokens.append(num_tokens)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.arrival

    @property
    def e2e(self) -> float:
        return self.chunk_times[-1] - self.arrival

    @property
    def tpot(self) -> float | None:
        n = self.num_output_tokens
        return (self.e2e - self.ttft) / (n - 1) if n > 1 else None

    @property
    def itls(self) -> list[float]:
        return list(np.diff(self.chunk_times))


def summarize(values: list[float]) -> dict[str, float | int]:
    """Mean, median and percentiles of `values` (seconds); count only when empty."""
    if not values:
        return {"count": 0}
    data = np.asarray(values, dtype=np.float64)
    summary = {"count": len(values), "mean": float(data.mean())}
    summary.update({"median" if q == 50 else f"p{q}": float(np.percentile(data, q)) for q in PERCENTILES})
    return summary


def parse_slo(text: str) -> dict[str, float]:
    """`ttft=0.5,tpot=50ms` -> {"ttft": 0.5, "tpot": 0.05} (seconds; `ms` or `s` suffixes)."""
    slo = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = re.fullmatch(r"(\w+)=(\d+(?:\.\d+)?)(ms|s)?", item)
        if not match or match.group(1) not in SLO_METRICS:
            raise RequestError(f"SLO item {item!r} is not METRIC=VALUE[ms|s] with METRIC in {SLO_METRICS}")
        slo[match.group(1)] = float(match.group(2)) / (1000 if match.group(3) == "ms" else 1)
    return slo


def meets_slo(timing: RequestTiming, slo: dict[str, float]) -> bool:
    for metric, limit in slo.items():
        value = getattr(timing, metric)
        if value is not None and value > limit:
            return False
    return True


def request_records(timings: list[RequestTiming]) -> list[dict]:
    """Per request, in workload order: when it was sent (s after the first), its token counts,
    TTFT, TPOT, E2E latency and inter-token gaps (None / empty where it produced no token), and
    its error: for analyses the summaries do not cover (vLLM's `--save-detailed`)."""
    origin = min(t.arrival for t in timings)
    return [{"sent_s": t.arrival - origin, "prompt_tokens": t.num_prompt_tokens, "output_tokens": t.num_output_tokens,
             "cached_tokens": t.num_cached_tokens, "ttft_s": t.ttft if t.chunk_times else None, "tpot_s": t.tpot,
             "e2e_s": t.e2e if t.chunk_times else None, "itls_s": t.itls, "error": t.error} for t in timings]


def run_metrics(timings: list[RequestTiming], duration: float, slo: dict[str, float] | None = None,
                detailed: bool = False) -> dict:
    """Throughput, latency summaries and (with `slo`) goodput of a run that took `duration` s, over
    the requests that completed; the failed ones are counted, with their errors. `detailed` adds
    every request's record (`request_records`)."""
    records = {"requests": request_records(timings)} if detailed else {}
    failed = [t for t in timings if t.error is not None or not t.chunk_times]
    timings = [t for t in timings if t.error is None and t.chunk_times]
    output_tokens = sum(t.num_output_tokens for t in timings)
    input_tokens = sum(t.num_prompt_tokens for t in timings)
    metrics = {
        "num_requests": len(timings),
        "failed_requests": len(failed),
        "errors": dict(collections.Counter(t.error or "no token came back" for t in failed)),
        "duration_s": duration,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "requests_per_s": len(timings) / duration,
        "input_tokens_per_s": input_tokens / duration,
        "output_tokens_per_s": output_tokens / duration,
        "total_tokens_per_s": (input_tokens + output_tokens) / duration,
        "prefix_cache_hit_rate": sum(t.num_cached_tokens for t in timings) / max(input_tokens, 1),
        "ttft_s": summarize([t.ttft for t in timings]),
        "tpot_s": summarize([t.tpot for t in timings if t.tpot is not None]),
        "itl_s": summarize([gap for t in timings for gap in t.itls]),
        "e2e_s": summarize([t.e2e for t in timings]),
    }
    if slo:
        met = sum(meets_slo(t, slo) for t in timings)
        metrics.update(slo=slo, goodput_requests_per_s=met / duration,
                       slo_attainment=met / (len(timings) + len(failed)))
    return {**metrics, **records}
