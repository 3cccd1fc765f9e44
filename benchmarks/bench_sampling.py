"""Times the in-graph sampler (jaxinfer.runner.sampling.sample, jitted) at V = 49152.

For S = 1, 8, 32 rows it prints the median milliseconds per call of each sampling setting, and,
as baselines measured in the same run, `jax.random.categorical` on temperature-scaled logits (the
least a sampler does) and a sort-based top-k/top-p sampler (the textbook formulation).

Logits are synthetic: "peaked" rows (normal * 4: a top-p 0.9 nucleus of ~30 tokens at T 0.7,
within the candidate list) and "flat" rows (normal * 1: a nucleus of ~20000 tokens, resolved by
the bisection fallback). Usage: python benchmarks/bench_sampling.py [--reps 20] [--rows 1 8 32]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.runner.sampling import build_sampling_metadata, sample
from jaxinfer.sampling_params import SamplingParams

VOCAB = 49152
HISTORY_LEN = 256
SETTINGS = {
    "greedy": (SamplingParams(temperature=0.0), 4.0),
    "greedy + 5 logprobs": (SamplingParams(temperature=0.0, logprobs=5), 4.0),
    "temperature only": (SamplingParams(temperature=0.7), 4.0),
    "top-k 50 + top-p 0.9, peaked": (SamplingParams(temperature=0.7, top_k=50, top_p=0.9), 4.0),
    "top-p 0.9, peaked": (SamplingParams(temperature=0.7, top_p=0.9), 4.0),
    "top-p 0.9, flat (bisection)": (SamplingParams(temperature=0.7, top_p=0.9), 1.0),
    "top-p + penalties, peaked": (SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.1,
                                                 frequency_penalty=0.2), 4.0),
}


def median_ms(fn, args, reps):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


@jax.jit
def categorical_baseline(logits, key):
    return jax.random.categorical(key, logits / 0.7, axis=-1)


@jax.jit
def sort_baseline(logits, key):
    """Top-k 50 then top-p 0.9 by a full descending sort of every row."""
    order = jnp.argsort(-logits, axis=-1)
    values = jnp.take_along_axis(logits, order, axis=-1) / 0.7
    ranks = jnp.arange(logits.shape[1])
    values = jnp.where(ranks < 50, values, -jnp.inf)
    probs = jax.nn.softmax(values, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    values = jnp.where(mass_before < 0.9, values, -jnp.inf)
    picked = jax.random.categorical(key, values, axis=-1)
    return jnp.take_along_axis(order, picked[:, None], axis=-1)[:, 0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    sample_jit = jax.jit(sample)
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, V={VOCAB}, history_len={HISTORY_LEN}, "
          f"median of {args.reps} calls, ms")
    for rows in args.rows:
        normal = rng.standard_normal((rows, VOCAB)).astype(np.float32)
        key = jax.random.key(0)
        peaked = jax.device_put(normal * 4)
        categorical_ms = median_ms(categorical_baseline, (peaked, key), args.reps)
        sort_ms = median_ms(sort_baseline, (peaked, key), max(3, args.reps // 5))
        print(f"S={rows:3d}  baselines: categorical {categorical_ms:8.2f}   sort top-k/top-p {sort_ms:8.2f}")
        for name, (params, scale) in SETTINGS.items():
            outputs = [list(rng.integers(0, VOCAB, HISTORY_LEN // 2)) for _ in range(rows)]
            metadata = build_sampling_metadata(
                [params] * rows, outputs, outputs, list(range(rows)), [0] * rows,
                num_seqs_bucket=rows, vocab_size=VOCAB, history_len=HISTORY_LEN)
            metadata = jax.device_put(metadata)
            logits = jax.device_put(normal * scale)
            ms = median_ms(sample_jit, (logits, metadata), args.reps)
            print(f"        {name:32s} {ms:8.2f}   x{ms / categorical_ms:5.2f} categorical   "
                  f"x{ms / sort_ms:5.3f} sort")


if __name__ == "__main__":
    main()
