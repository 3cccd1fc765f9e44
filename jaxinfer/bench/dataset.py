"""Benchmark workloads: lists of `BenchRequest` (prompt token ids, number of tokens to generate).

Random workloads draw prompt and output lengths uniformly from inclusive ranges and prompt tokens
uniformly from the vocabulary, all from one seeded numpy Generator, so a seed fixes the workload.
With a shared prefix (`prefix_len` > 0, as vLLM's `--random-prefix-len`), request i's prompt starts
with prefix i % num_prefixes, drawn from a second Generator of the same seed, so the rest of the
workload is the one without prefixes: a system prompt or few-shot header that prefix caching serves.
Dataset files (`--dataset`) come in two kinds, told apart by their first row:
- prompts, one JSON object per line: `{"prompt": str}` or `{"prompt_token_ids": [int]}`, optionally
  with `"max_tokens": int`; taken in file order;
- ShareGPT conversations (what vLLM's `bench serve` reads): a JSON list, or JSON lines, of
  `{"conversations": [{"from": "human", "value": str}, {"from": "gpt", "value": str}, ...]}`. As in
  vLLM, the first turn is the prompt and the second's token count the output length; conversations
  are drawn in an order shuffled by the seed, and those with fewer than two turns, under 4 tokens of
  prompt or reply, or longer than the engine's max_model_len are skipped.
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


# vLLM's ShareGPT filter: shorter prompts or replies are not conversations worth timing.
MIN_SHAREGPT_TOKENS = 4


@dataclasses.dataclass(frozen=True)
class DatasetSample:
    """The requests drawn from a dataset file, and how many of its rows were skipped (ShareGPT's
    filter; prompt files skip none)."""

    requests: list[BenchRequest]
    skipped: int


@dataclasses.dataclass(frozen=True)
class DatasetFile:
    """A dataset file's rows, each with its place for error messages: `path[i]` in a JSON list,
    `path:line` in JSON lines. `--dataset` reads the file while the command line is parsed, so a
    missing, empty or malformed file is refused before any engine loads or server is asked."""

    path: Path
    rows: tuple[tuple[str, object], ...] = dataclasses.field(repr=False)  # a ShareGPT file holds ~100k

    @classmethod
    def read(cls, path: str | Path) -> DatasetFile:
        path = Path(path)
        if not path.is_file():
            raise RequestError(f"{path} is not a file; pass a JSONL file of prompts or a ShareGPT JSON file")
        text = path.read_text()
        if text.lstrip().startswith("["):
            rows = [(f"{path}[{i}]", row) for i, row in enumerate(_parse_json(text, str(path)))]
        else:
            rows = [(f"{path}:{number}", _parse_json(line, f"{path}:{number}"))
                    for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
        if not rows:
            raise RequestError(f"dataset file {path} holds no requests")
        return cls(path, tuple(rows))


def dataset_requests(dataset: DatasetFile, encode: Callable[[str], list[int]], default_max_tokens: int,
                     num_requests: int, seed: int, max_model_len: int) -> DatasetSample:
    """Up to `num_requests` requests from a prompts file or a ShareGPT file (see the module
    docstring); text is tokenized with `encode`, which may be a remote tokenizer: ShareGPT rows are
    tokenized only until enough requests are found."""
    rows = dataset.rows
    if isinstance(rows[0][1], dict) and "conversations" in rows[0][1]:
        return _sharegpt_requests(rows, encode, num_requests, seed, max_model_len)
    return DatasetSample([_prompt_request(where, row, encode, default_max_tokens)
                          for where, row in rows[:num_requests]], skipped=0)


def _parse_json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise RequestError(f"{where} is not JSON ({error}); a dataset is JSON lines or one JSON list") from None


def _prompt_request(where: str, row, encode: Callable[[str], list[int]], default_max_tokens: int) -> BenchRequest:
    try:
        ids = row["prompt_token_ids"] if "prompt_token_ids" in row else encode(row["prompt"])
        return BenchRequest(tuple(int(t) for t in ids), int(row.get("max_tokens", default_max_tokens)))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise RequestError(f"{where} is not a JSON object with 'prompt' or 'prompt_token_ids' "
                           "(and an integer 'max_tokens')") from None


def _sharegpt_requests(rows: tuple[tuple[str, object], ...], encode: Callable[[str], list[int]], num_requests: int,
                       seed: int, max_model_len: int) -> DatasetSample:
    requests, skipped = [], 0
    for index in np.random.default_rng(seed).permutation(len(rows)):
        if len(requests) == num_requests:
            break
        where, row = rows[index]
        try:
            turns = [turn["value"] for turn in row["conversations"][:2]]
            if not all(isinstance(turn, str) for turn in turns):
                raise TypeError
        except (KeyError, TypeError):
            raise RequestError(f"{where} is not a ShareGPT conversation: expected "
                               "{\"conversations\": [{\"from\": ..., \"value\": str}, ...]}") from None
        if len(turns) < 2:
            skipped += 1
            continue
        prompt, reply = encode(turns[0]), len(encode(turns[1]))
        if min(len(prompt), reply) < MIN_SHAREGPT_TOKENS or len(prompt) + reply > max_model_len:
            skipped += 1
            continue
        requests.append(BenchRequest(tuple(int(t) for t in prompt), reply))
    if not requests:
        raise RequestError(f"none of the {len(rows)} ShareGPT conversations has two turns of at least "
                           f"{MIN_SHAREGPT_TOKENS} tokens within the engine's max_model_len ({max_model_len})")
    return DatasetSample(requests, skipped)


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
