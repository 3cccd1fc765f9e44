"""Where a decode (or prefill) step's time goes: a jax.profiler trace of engine steps, summed by op.

Runs an engine (a built engine directory, a checkpoint, or random:CONFIG) with B requests that decode
together, traces --steps model steps after a warm-up (each step of a multi-step decode call counts;
with --prompt-len P instead: the steps that prefill B fresh prompts of P random tokens, chunked by
the engine's token budget, after one such round as a warm-up), and prints the wall time per step and, per traced
process (the host's XLA threads on a CPU; each GPU's streams), the ops that took the most time per
step, by kind: custom calls by their target (the C++ kernels on a CPU), other ops by their name
without its number (XLA fusions, copies); `ops` counts the distinct ops of a kind. The wrappers around them
(Python frames, thunk executors) are left out, so the op times of a CPU step sum to the compute and
the rest of the wall time is the host's work and waiting. The trace itself stays in --trace-dir for
Perfetto (ui.perfetto.dev).

    .venv/bin/python benchmarks/profile_step.py engines/bf16 [--batch 1] [--steps 20] [--top 15]
    .venv/bin/python benchmarks/profile_step.py engines/bf16 --prompt-len 512     # prefill steps
    python3 benchmarks/profile_step.py random:configs/models/llama3-8b --kv-memory 8GiB   # on a GPU
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import random
import re
import time
from pathlib import Path

import jax

from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.create import create_engine
from jaxinfer.sampling_params import SamplingParams

# Trace events that wrap the ops rather than being ops: by prefix, and XLA's control flow (a
# multi-step decode's while loop, the sampling branches), whose body ops are traced themselves.
_WRAPPER_PREFIXES = ("$", "end: ", "ThunkExecutor", "PjitFunction", "CommonPjRtLoadedExecutable", "np.asarray")
_CONTROL_FLOW = re.compile(r"(while|cond|conditional|call)(\.\d+)?$")


def warm_up_steps(batch: int, context: int, token_budget: int, decode_steps: int) -> int:
    """Model steps before the traced ones: the prompts' prefill chunks (early requests decode
    meanwhile), then enough decodes that every traced step is a steady decode."""
    return -(-batch * context // token_budget) + 8 + 2 * decode_steps


def decode_tokens(batch: int, context: int, steps: int, token_budget: int, decode_steps: int) -> int:
    """Each request's max_tokens: it keeps decoding through the warm-up, the traced steps and the last
    multi-step call's overshoot."""
    return steps + 2 * warm_up_steps(batch, context, token_budget, decode_steps)


def trace_steps(engine, batch: int, context: int, steps: int, trace_dir: Path) -> tuple[float, int]:
    """Seconds per model step and the model steps traced: the engine calls that run at least `steps`
    decode steps of `batch` sequences after distinct random prompts of `context` tokens (a multi-step
    decode call counts each of its steps)."""
    cfg = engine.engine_cfg
    margin = warm_up_steps(batch, context, cfg.max_num_batched_tokens, cfg.decode_steps)
    max_tokens = decode_tokens(batch, context, steps, cfg.max_num_batched_tokens, cfg.decode_steps)
    rng, vocab = random.Random(0), engine.model_cfg.vocab_size
    for i in range(batch):
        engine.add_request(f"profile-{i}", prompt_token_ids=[rng.randrange(3, vocab) for _ in range(context)],
                           params=SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    while engine.num_steps < margin:  # prefill and the first decodes, so every traced step is a steady decode
        engine.step()
    first = engine.num_steps
    jax.profiler.start_trace(str(trace_dir), create_perfetto_trace=True)
    start = time.perf_counter()
    while engine.num_steps - first < steps:
        engine.step()
    traced = engine.num_steps - first
    seconds = (time.perf_counter() - start) / traced
    jax.profiler.stop_trace()
    while engine.has_unfinished_requests():
        engine.step()
    return seconds, traced


class _BucketsUsed(dict):
    """An engine's executables by bucket that remembers which buckets the runner ran."""

    def __init__(self, executables):
        super().__init__(executables)
        self.used: set = set()

    def __getitem__(self, bucket):
        self.used.add(bucket)
        return super().__getitem__(bucket)


def trace_prefill_steps(engine, batch: int, prompt_len: int, trace_dir: Path) -> tuple[float, int, set]:
    """Seconds per step, the number of steps and the buckets they ran, for the steps that prefill
    `batch` fresh prompts of `prompt_len` random tokens (each request then stops at its first
    token), traced after one untraced round."""
    rng, vocab = random.Random(0), engine.model_cfg.vocab_size

    def prefill_round(name: str) -> int:
        for i in range(batch):
            engine.add_request(f"{name}-{i}", prompt_token_ids=[rng.randrange(3, vocab) for _ in range(prompt_len)],
                               params=SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        return steps

    prefill_round("warm-up")
    executables = engine.runner.executables
    engine.runner.executables = _BucketsUsed(executables)
    jax.profiler.start_trace(str(trace_dir), create_perfetto_trace=True)
    start = time.perf_counter()
    steps = prefill_round("profile")
    seconds = (time.perf_counter() - start) / steps
    jax.profiler.stop_trace()
    buckets, engine.runner.executables = engine.runner.executables.used, executables
    return seconds, steps, buckets


def op_kinds(engine, buckets) -> dict[str, str]:
    """HLO instruction name -> its kind in the steps of `buckets`: a custom call's target
    (jaxinfer_dense_dot, a Pallas kernel's name on a GPU, ...); a name that is a different call
    in different buckets (the trace does not say which bucket an op ran in) gets both targets."""
    kinds: dict[str, set[str]] = collections.defaultdict(set)
    for bucket in buckets:
        hlo = engine.runner.executables[bucket].as_text()
        for name, target in re.findall(r'([\w.-]+) = [^\n]*?custom_call_target="([\w.-]+)"', hlo):
            kinds[name].add(target)
    return {name: "|".join(sorted(targets)) for name, targets in kinds.items()}


def kind_of(name: str, kinds: dict[str, str]) -> str:
    """A traced op's kind: its custom call target, else its name without the .N that numbers it."""
    return kinds.get(name) or re.sub(r"\.\d+$", "", name)


def op_times(trace_file: Path) -> dict[str, collections.Counter]:
    """Microseconds per op name over the trace, per traced process (Python frames and wrappers left out)."""
    with gzip.open(trace_file) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    totals: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in events:
        if (e.get("ph") != "X" or threads.get((e["pid"], e["tid"])) == "python"
                or e["name"].startswith(_WRAPPER_PREFIXES) or _CONTROL_FLOW.match(e["name"])):
            continue
        totals[processes.get(e["pid"], str(e["pid"]))][e["name"]] += e["dur"]
    return totals


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", help="engine directory, checkpoint or random:CONFIG (default model if omitted)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--context", type=int, default=32, help="prompt tokens before the decode steps")
    parser.add_argument("--prompt-len", type=int, default=0, help="profile the prefill steps of prompts of this many tokens")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--kv-memory", default="256MiB", help="KV pool size when the engine is built here")
    parser.add_argument("--trace-dir", type=Path, default=Path("results/profile"))
    args = parser.parse_args()
    # A built engine keeps its own config; a checkpoint gets the buckets these steps need (for
    # prefill, the configured token budget).
    token_budget = None if args.prompt_len else max(64, args.batch)
    decoded = 0 if args.prompt_len else decode_tokens(args.batch, args.context, args.steps, token_budget,
                                                      EngineConfig.create().decode_steps)
    engine = create_engine(args.model, progress=False, max_num_seqs=args.batch, max_num_batched_tokens=token_budget,
                           max_model_len=max(512, args.prompt_len + 16, args.context + decoded), kv_memory=args.kv_memory)
    ladder = engine.engine_cfg.ladder
    if args.prompt_len:
        seconds, steps, buckets = trace_prefill_steps(engine, args.batch, args.prompt_len, args.trace_dir)
        what = f"{args.batch} prompt(s) of {args.prompt_len} tokens in {steps} steps ({', '.join(b.name for b in buckets)})"
    else:
        seconds, steps = trace_steps(engine, args.batch, args.context, args.steps, args.trace_dir)
        what, buckets = f"batch {args.batch} at {args.context}+ positions", [ladder.select(args.batch, args.batch, args.batch)]
    trace_file = max(args.trace_dir.glob("**/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    print(f"{args.model or 'default model'}, {what}: {seconds * 1e3:.2f} ms per step (wall, traced); "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}; trace {trace_file}")
    kinds = op_kinds(engine, buckets)
    for process, totals in op_times(trace_file).items():
        by_kind, calls = collections.Counter(), collections.Counter()
        for name, micros in totals.items():
            by_kind[kind_of(name, kinds)] += micros
            calls[kind_of(name, kinds)] += 1
        print(f"\n{process}: {sum(totals.values()) / steps / 1e3:.2f} ms of ops per step")
        print(f"  {'ms/step':>8} {'ops':>5}  kind (custom call target, or op name)")
        for kind, micros in by_kind.most_common(args.top):
            print(f"  {micros / steps / 1e3:8.3f} {calls[kind]:>5}  {kind[:100]}")


if __name__ == "__main__":
    main()
