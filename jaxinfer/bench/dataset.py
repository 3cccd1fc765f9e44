"""Benchmark workloads: lists of `BenchRequest` (prompt token ids, number of tokens to generate).

Random workloads draw prompt and output lengths uniformly from inclusive ranges and prompt tokens
uniformly from the vocabulary, all from one seeded numpy Generator, so a seed fixes the workload.
With a shared prefix (`prefix_len` > 0, as vLLM's `--random-prefix-len`), request i's prompt starts
with prefix i % num_prefixes, drawn from a second Generator of the same seed, so the rest of the
workload is the one without prefixes: a system prompt or few-shot header that prefix caching serves.
JSONL workloads hold one object per line: `{"prompt": str}` or `{"prompt_token_ids": [int]}`,
optionally with `"max_tokens": int`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np

from jaxinfer.errors import RequestError


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: tuple[int, ...]
    max_tokens: int


@dataclasses.dataclass(frozen=True)
class LengthRange:
    """An inclusive range of token counts, written `N` or `LO:HI` on the command line."""

    low: int
    high: int

    def __post_init__(self):
        if not 1 <= self.low <= self.high:
            raise RequestError(f"length range {self.low}:{self.high} must satisfy 1 <= low <= high")

    @classmethod
    def parse(cls, text: str) -> LengthRange:
        parts = text.split(":")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise RequestError(f"length {text!r} is neither N nor LO:HI (positive integers)") from None
        if len(values) not in (1, 2):
            raise RequestError(f"length {text!r} is neither N nor LO:HI")
        return cls(values[0], values[-1])

    def __str__(self) -> str:
        return f"{self.low}" if self.low == self.high else f"{self.low}:{self.high}"


def random_requests(num_requests: int, input_len: LengthRange, output_len: LengthRange,
                    vocab_size: int, seed: int, prefix_len: int = 0, num_prefixes: int = 1) -> list[BenchRequest]:
    """`num_requests` requests with uniform random lengths and prompt tokens in [0, vocab_size),
    each prompt after one of `num_prefixes` shared prefixes of `prefix_len` tokens."""
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(input_len.low, input_len.high + 1, size=num_requests)
    output_lens = rng.integers(output_len.low, output_len.high + 1, size=num_requests)
    own = [tuple(int(t) for t in rng.integers(0, vocab_size, size=int(n))) for n in prompt_lens]
    prefixes = [tuple(int(t) for t in prefix)
                for prefix in np.random.default_rng([seed, 1]).integers(0, vocab_size, size=(num_prefixes, prefix_len))]
    return [BenchRequest(prefixes[i % num_prefixes] + tokens, int(m))
            for i, (tokens, m) in enumerate(zip(own, output_lens))]


def jsonl_requests(path: Path, encode: Callable[[str], list[int]], default_max_tokens: int) -> list[BenchRequest]:
    """Requests from a JSONL file; text prompts are tokenized with `encode`."""
    if not path.is_file():
        raise RequestError(f"dataset file {path} does not exist; pass a JSONL file of prompts")
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ids = row["prompt_token_ids"] if "prompt_token_ids" in row else encode(row["prompt"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise RequestError(f"{path}:{number} is not a JSON object with 'prompt' or 'prompt_token_ids'") from None
        requests.append(BenchRequest(tuple(int(t) for t in ids), int(row.get("max_tokens", default_max_tokens))))
    if not requests:
        raise RequestError(f"dataset file {path} holds no requests")
    return requests


def refuse_oversized(requests: list[BenchRequest], max_model_len: int) -> None:
    """Raises a RequestError naming the requests whose prompt plus output exceed `max_model_len`
    (an engine would refuse each of them), before anything is measured."""
    oversized = [i for i, r in enumerate(requests) if len(r.prompt_token_ids) + r.max_tokens > max_model_len]
    if oversized:
        first = requests[oversized[0]]
        raise RequestError(f"{len(oversized)} of {len(requests)} requests exceed the engine's max_model_len "
                           f"({max_model_len} tokens of prompt plus output; request {oversized[0]}: "
                           f"{len(first.prompt_token_ids)} + {first.max_tokens}); lower --input-len / --output-len "
                           "(or the dataset's prompts and max_tokens), or build with a larger --max-model-len")


def fresh_prefixes(requests: list[BenchRequest], run_index: int, vocab_size: int) -> list[BenchRequest]:
    """The workload with each prompt's first token shifted by `run_index`: the same lengths and
    work, but no block hash shared with another run's prompts, so a run over the same engine
    never profits from the prefix cache a previous run filled."""
    return [dataclasses.replace(r, prompt_token_ids=((r.prompt_token_ids[0] + run_index) % vocab_size,
                                                     *r.prompt_token_ids[1:]))
            for r in requests]


def workload_summary(requests: list[BenchRequest]) -> dict:
    """Counts describing a workload, for the JSON results."""
    return {"num_requests": len(requests),
            "input_tokens": sum(len(r.prompt_token_ids) for r in requests),
            "output_tokens": sum(r.max_tokens for r in requests)}
