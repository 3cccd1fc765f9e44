"""What every baseline worker does with a job, whatever library generates: the job format, the
timing method and the results. Standard library only: it runs inside the baselines' own Pythons,
imported by the worker scripts beside it (hf_worker.py, llamacpp_worker.py) as a top-level module.

    PYTHON jaxinfer/bench/<name>_worker.py JOB.json   ->  results JSON on stdout

JOB.json: {"model": checkpoint path, "threads": int, "dtype": the engine's ("float32" | "bfloat16"),
           "job": "throughput" | "latency", ...}
  throughput: "requests": [[prompt ids, max_tokens], ...], "batch_size": B
      Consecutive batches of B requests, each generating exactly the longest max_tokens of its
      batch (EOS ignored); only each request's own max_tokens count as output.
      -> {"duration_s", "input_tokens", "output_tokens", "num_requests", "batch_size"}
  latency: "ttft_prompts": {length: [[ids], ...]}, "decode_prompts": [[ids], ...], "decode_tokens": N,
           "batch_sizes": [1, 8], "decode_repeats": R (default 1)
      TTFT: median time to the first new token per prompt length. Decode rate at batch b: the
      median over R N-token generations of b x (N - 1) tokens over the time from the generation's
      first new tokens to its end (as the engine's own rate counts from first token to last: the
      prompt's prefill, whose time varies from run to run, stays out of it).
      -> {"ttft_s": {length: s}, "decode_tokens_per_s": {b: tokens/s}}
Both results also carry the worker's `info` (library versions, the dtype it ran) and "threads".

A worker calls `serve(load)`, where `load(job)` returns a Backend: `generate(prompts, new_tokens)`
runs one greedy generation of exactly `new_tokens` tokens for a batch of prompts (token id lists)
and returns the time.perf_counter() at which its first new tokens came out.
"""

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Protocol


WARM_UP_TOKENS = 2


class Backend(Protocol):
    info: dict

    def generate(self, prompts: list[list[int]], new_tokens: int) -> float: ...


def timed_generate(backend: Backend, prompts: list[list[int]], new_tokens: int,
                   clock: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    """(seconds to the first new tokens, seconds to the end) of one generation."""
    start = clock()
    first = backend.generate(prompts, new_tokens)
    return first - start, clock() - start


def throughput(backend: Backend, job: dict, clock: Callable[[], float] = time.perf_counter) -> dict:
    requests, batch = job["requests"], job["batch_size"]
    start = clock()
    for first in range(0, len(requests), batch):
        group = requests[first:first + batch]
        backend.generate([ids for ids, _ in group], max(tokens for _, tokens in group))
    return {"duration_s": clock() - start, "num_requests": len(requests), "batch_size": batch,
            "input_tokens": sum(len(ids) for ids, _ in requests),
            "output_tokens": sum(tokens for _, tokens in requests)}


def latency(backend: Backend, job: dict, clock: Callable[[], float] = time.perf_counter) -> dict:
    ttft = {length: statistics.median(timed_generate(backend, [ids], 1, clock)[0] for ids in prompts)
            for length, prompts in job["ttft_prompts"].items()}
    n = job["decode_tokens"]
    rates = {}
    for b in job["batch_sizes"]:
        prompts = job["decode_prompts"][:b]
        timed_generate(backend, prompts, WARM_UP_TOKENS, clock)  # warm-up for this batch shape
        rates[str(b)] = statistics.median(b * (n - 1) / (end_s - first_s) for first_s, end_s in
                                          (timed_generate(backend, prompts, n, clock)
                                           for _ in range(job.get("decode_repeats", 1))))
    return {"ttft_s": ttft, "decode_tokens_per_s": rates}


def max_sequence_len(job: dict) -> int:
    """The longest prompt + generated tokens the job runs, warm-up included: a context to size for."""
    if job["job"] == "throughput":
        return max(len(ids) + tokens for ids, tokens in job["requests"])
    prompts = [ids for group in job["ttft_prompts"].values() for ids in group] + job["decode_prompts"]
    return max(len(ids) for ids in prompts) + max(job["decode_tokens"], WARM_UP_TOKENS)


JOBS = {"throughput": throughput, "latency": latency}


def serve(load: Callable[[dict], Backend]) -> None:
    """The worker's main: the job file named on the command line in, its results on stdout."""
    job = json.loads(Path(sys.argv[1]).read_text())
    backend = load(job)
    timed_generate(backend, [[1, 2, 3]], WARM_UP_TOKENS)  # first-call overheads stay out of the figures
    result = JOBS[job["job"]](backend, job)
    json.dump({**result, **backend.info, "threads": job["threads"]}, sys.stdout)
