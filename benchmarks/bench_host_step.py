"""The host's share of a decode step at large batches: what the engine's Python costs per step,
apart from the device's work, on a model small enough that the device's part stays short.

On a GPU a step of a small model (or a large batch of any) takes a few milliseconds on the device,
and the host's work for it (scheduling, the step's input arrays, the executable call, taking the
tokens back, outputs and detokenization) is done while the device waits; on the H200 the SmolLM2-
shaped engine's batch-1 step took 4.7 ms for 0.08 ms of weight streaming. This measures that work on
any machine: B sequences with --prompt-len tokens of context decode together on a random-weights
model of `--config`'s shape (default: a two-layer, 64-wide Llama of 256 positions; longer contexts
need a config with more), and for each step it splits the wall time into

    device wait   time blocked on the step's results (jax.device_get of the sampled tokens)
    call          the compiled executable's call (argument handling and dispatch)
    host          everything else: scheduling, building the step's arrays, outputs

with medians over --steps steps per batch size, then a cProfile of whole steps at the largest
(the device wait shows there as jax's array `_value`).

    .venv/bin/python benchmarks/bench_host_step.py [--batch-sizes 32,128,256] [--steps 40] [--prompt-len 16]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import statistics
import time
from pathlib import Path

import jax

from jaxinfer.engine.create import create_engine
from jaxinfer.runner import model_runner
from jaxinfer.sampling_params import SamplingParams

TINY_CONFIG = Path(__file__).resolve().parent.parent / "tests" / "checkpoints" / "tiny-llama3"


class StepClock:
    """Seconds per step spent in the executable call and in the device wait of `engine`'s runner."""

    def __init__(self, engine):
        self.call_s = self.wait_s = 0.0
        runner = engine.runner
        runner.executables = {bucket: self._timed(executable, "call_s")
                              for bucket, executable in runner.executables.items()}
        self._device_get = jax.device_get

    def _timed(self, fn, field: str):
        def run(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                setattr(self, field, getattr(self, field) + time.perf_counter() - start)
        return run

    @contextlib.contextmanager
    def installed(self):
        """Times the runner's jax.device_get while active."""
        model_runner.jax.device_get = self._timed(self._device_get, "wait_s")
        try:
            yield self
        finally:
            model_runner.jax.device_get = self._device_get


def steady_engine(config: str, batch: int, prompt_len: int, max_model_len: int, kv_memory: str):
    # One model step per call: this measures the host's work per step, which multi-step decode
    # (engine.yaml's decode_steps) divides among the steps of a call.
    engine = create_engine(f"random:{config}", progress=False, max_num_seqs=batch,
                           max_num_batched_tokens=max(256, batch), max_model_len=max_model_len, kv_memory=kv_memory,
                           decode_steps=1)
    for i in range(batch):
        engine.add_request(f"r{i}", prompt_token_ids=[3 + (i + j) % 50 for j in range(prompt_len)],
                           params=SamplingParams(temperature=0.7, top_p=0.9, max_tokens=max_model_len - prompt_len,
                                                 ignore_eos=True, seed=i))
    while engine.scheduler.metrics().num_waiting:
        engine.step()
    for _ in range(8):  # the last prompts done: every row decoding
        engine.step()
    return engine


def measure(engine, steps: int) -> dict[str, float]:
    clock = StepClock(engine)
    walls, calls, waits = [], [], []
    with clock.installed():
        for _ in range(steps):
            clock.call_s = clock.wait_s = 0.0
            start = time.perf_counter()
            engine.step()
            walls.append(time.perf_counter() - start)
            calls.append(clock.call_s)
            waits.append(clock.wait_s)
    hosts = [w - c - d for w, c, d in zip(walls, calls, waits)]
    return {name: statistics.median(values) * 1e3
            for name, values in (("step", walls), ("device wait", waits), ("call", calls), ("host", hosts))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(TINY_CONFIG), help="an HF config directory (random weights of its shape)")
    parser.add_argument("--batch-sizes", default="32,128,256")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prompt-len", type=int, default=16, help="tokens of context each sequence starts with")
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--kv-memory", default="1GiB", help="KV pool size (enough for every sequence's context)")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; random weights of {args.config}; "
          f"{args.prompt_len}-token prompts; median ms per decode step")
    print(f"{'batch':>6} {'step':>8} {'device wait':>12} {'call':>8} {'host':>8} {'host us/seq':>12}")
    for batch in batches:
        engine = steady_engine(args.config, batch, args.prompt_len, args.max_model_len, args.kv_memory)
        t = measure(engine, args.steps)
        print(f"{batch:>6} {t['step']:8.2f} {t['device wait']:12.2f} {t['call']:8.2f} {t['host']:8.2f} "
              f"{t['host'] * 1e3 / batch:12.1f}")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.steps):
        engine.step()
    profile.disable()
    print(f"\ncProfile of {args.steps} steps at batch {batches[-1]} (device wait included, in "
          "jax's array _value):")
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
