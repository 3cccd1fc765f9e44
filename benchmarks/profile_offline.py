"""Where an offline run's time goes: the steps of `jaxinfer bench throughput`'s workload, by bucket.

Runs the offline workload (all requests at once; the same random requests as `jaxinfer bench
throughput` for the same workload options, a --dataset of prompts included) through an
in-process engine and times every call of the compiled step, grouped by the bucket it ran and the
model steps per call (a multi-step decode call runs several). It prints the output tokens/s, the
wall time split into the steps and everything else (scheduling, inputs, outputs: the host), and
per bucket the calls, their total and their mean. `benchmarks/profile_step.py` then says where one
step's time goes, op by op.

    .venv/bin/python benchmarks/profile_offline.py engines/bf16 [--num-requests 256]
"""

from __future__ import annotations

import argparse
import collections
import time

from jaxinfer.bench.dataset import fresh_prefixes
from jaxinfer.bench.engine_runs import drive
from jaxinfer.bench.runs import sampling, warm_up, workload
from jaxinfer.commands.bench import add_workload_args
from jaxinfer.engine.create import create_engine
from jaxinfer.runner.model_runner import ModelRunner


def timed_calls(runner: ModelRunner) -> dict[tuple[str, int], list[float]]:
    """Wraps `runner.execute` so that every call's seconds land under (bucket name, model steps)."""
    seconds = collections.defaultdict(list)
    execute = runner.execute

    def timed(out, seed_of):
        start = time.perf_counter()
        result = execute(out, seed_of)
        seconds[(runner.bucket_of(out).name, out.num_steps)].append(time.perf_counter() - start)
        return result

    runner.execute = timed
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", help="engine directory, checkpoint or .gguf (default model if omitted)")
    add_workload_args(parser, num_requests=256)
    args = parser.parse_args()
    engine = create_engine(args.model, progress=False)
    vocab = engine.model_cfg.vocab_size
    warm_up(engine)
    # Shifted first tokens, as bench throughput's own run takes them (no prefix cache from earlier runs).
    requests = fresh_prefixes(workload(args, vocab, engine.tokenizer.encode, engine.engine_cfg.max_model_len), 1, vocab)
    seconds = timed_calls(engine.runner)
    _, wall = drive(engine, requests, [0.0] * len(requests), sampling=sampling(args))
    in_steps = sum(map(sum, seconds.values()))
    print(f"{args.model or 'default model'}: {sum(r.max_tokens for r in requests) / wall:.1f} output tokens/s, "
          f"{wall:.1f} s: {in_steps:.1f} s in steps, {wall - in_steps:.1f} s outside them")
    print(f"  {'bucket':>12} {'steps/call':>10} {'calls':>6} {'total s':>8} {'mean ms':>8}")
    for (bucket, steps), times in sorted(seconds.items(), key=lambda item: -sum(item[1])):
        print(f"  {bucket:>12} {steps:>10} {len(times):>6} {sum(times):>8.2f} {1e3 * sum(times) / len(times):>8.1f}")


if __name__ == "__main__":
    main()
