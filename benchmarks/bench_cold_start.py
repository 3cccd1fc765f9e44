"""Cold start: seconds from launching a fresh Python process to its first generated token, for a
built engine against the same engine made from its checkpoint at start-up.

    engine      `create_engine(ENGINE, background=True)`: the manifest checked, weights mapped, the
                buckets' executables deserializing in the background (the first request's wait
                for its bucket counts in "first token"); no compilation (what `jaxinfer serve
                ENGINE` does before it serves)
    checkpoint  `create_engine(CHECKPOINT, **the engine's build config)`: the checkpoint read and
                converted, every bucket of the same ladder compiled in-process, the way an engine
                without ahead-of-time compilation starts (jax's persistent compilation cache off)

Each round launches one process of each kind, in alternating order, and each child prints when its
imports finished, when its engine was ready and when its first token (greedy, one short prompt) came
back; the parent adds the process launch. It prints the medians of every phase and the ratio of the
totals.

    .venv/bin/python benchmarks/bench_cold_start.py engines/bf16 [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PHASES = ("launch", "imports", "engine ready", "first token")


def child(model: str, overrides: dict) -> None:
    """Runs in the launched process: prints the wall-clock time after each phase as JSON."""
    marks = {"launch": time.time()}
    from jaxinfer.engine.create import create_engine
    from jaxinfer.sampling_params import SamplingParams

    marks["imports"] = time.time()
    engine = create_engine(model, progress=False, background=True, **overrides)
    marks["engine ready"] = time.time()
    engine.add_request("cold", prompt="The capital of France is", params=SamplingParams(max_tokens=1, temperature=0))
    while engine.has_unfinished_requests():
        engine.step()
    marks["first token"] = time.time()
    print(json.dumps(marks))


def launch(model: str, overrides: dict) -> dict[str, float]:
    """Seconds each phase took in a fresh process (`launch`: from starting it to its first line)."""
    env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"}
    start = time.time()
    done = subprocess.run([sys.executable, __file__, model, "--child", json.dumps(overrides)], env=env,
                          capture_output=True, text=True, check=True)
    marks = json.loads(done.stdout.strip().splitlines()[-1])
    times = [start] + [marks[phase] for phase in PHASES]
    return {phase: later - earlier for phase, earlier, later in zip(PHASES, times, times[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engine", help="built engine directory (`jaxinfer build`); in a child, the model to start")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.engine, json.loads(args.child))
    manifest = json.loads((Path(args.engine) / "manifest.json").read_text())
    kinds = {"engine": (args.engine, {}), "checkpoint": (manifest["source"], manifest["engine_config"])}
    runs = {kind: [] for kind in kinds}
    for round_index in range(args.rounds):
        for kind in (list(kinds) if round_index % 2 == 0 else list(reversed(kinds))):
            runs[kind].append(launch(*kinds[kind]))
    print(f"{args.engine} ({len(manifest['buckets'])} buckets), source {manifest['source']}; "
          f"medians of {args.rounds} fresh processes each, seconds")
    print(f"{'':>12}" + "".join(f"{phase:>14}" for phase in PHASES) + f"{'total':>10}")
    totals = {}
    for kind, phases in runs.items():
        medians = [statistics.median(run[phase] for run in phases) for phase in PHASES]
        totals[kind] = statistics.median(sum(run.values()) for run in phases)
        print(f"{kind:>12}" + "".join(f"{m:>14.2f}" for m in medians) + f"{totals[kind]:>10.2f}")
    print(f"checkpoint / engine: {totals['checkpoint'] / totals['engine']:.1f}x")


if __name__ == "__main__":
    main()
