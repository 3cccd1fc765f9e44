"""Times the XLA formulations of each quantized matmul on the default model's shapes (CPU).

For every weight shape `[in -> out]` and activation row count M it prints the median time of:
    f32 / bf16 baselines   `jnp.dot` on an f32 weight; on a bf16 weight with f32 accumulation
    each mode's candidates (int8 W8A16, int4 W4A16, w8a8 int8, fp8), the first of which ("xla") is
    what the kernel modules' dispatchers run on CPU, the others the formulations it was chosen over
with the ratio to both baselines measured in the same run, and the weight bytes streamed per second.
Activations are float32 (the CPU model's dtype). Weights are device arrays (numpy arguments would be
copied on every call). Like the model's 30 layers, one jitted call multiplies by enough distinct
copies of a weight (`--stream-mb` of f32 weights in all, well past the 32 MiB L3 cache) that weights
stream from memory rather than cache, and Python dispatch is amortized; times are per matmul.
Formulations are timed in turns (one call each per round, in a random order), so load changes on a
shared machine shift all of them alike, and the cache is flushed before every timed call (the quantized copies
alone would fit the L3 cache and make later formulations look faster than earlier ones).

    .venv/bin/python -m benchmarks.bench_quant_matmul [--reps 20] [--rows 1 2 16 64] [--shapes 576x1536 ...]
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.quant import quantize_weight
from pallas_kernels.activation_quant import quantize_per_token
from pallas_kernels.int4_matmul import dequantize_int4, int4_matmul, split_activation_group_dot
from pallas_kernels.int8_matmul import int8_matmul, split_activation_dot
from pallas_kernels.quant_tiling import pad_rows
from pallas_kernels.w8a8_matmul import w8a8_matmul
from pallas_kernels.xla_cpu import after_activations

DEFAULT_SHAPES = ("576x1536", "1536x576", "576x49152")
DEFAULT_ROWS = (1, 2, 16, 64)
# Twice the 32 MiB L3 cache: reading this much evicts every weight a timed call could reuse.
CACHE_FLUSH_BYTES = 64 * 2**20


def _dot_f32_acc(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _bf16_weight_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    return _dot_f32_acc(x.astype(jnp.bfloat16), w)


def _dot_i32(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, preferred_element_type=jnp.int32)


def _per_token_dot(x: jax.Array, w, dot: Callable) -> jax.Array:
    """W8A8 with the dispatcher's activation quantization and scaling around another `dot(x_q, w_q)`."""
    x_q, x_scale = quantize_per_token(x, w.q.dtype)
    return dot(x_q, w.q).astype(jnp.float32) * x_scale[:, None] * w.scale


def _two_row_dot_f32_acc(x: jax.Array, w: jax.Array) -> jax.Array:
    """bf16 dot of at least two rows (XLA:CPU's 1-row bf16 dot is slow)."""
    return _dot_f32_acc(pad_rows(x.astype(jnp.bfloat16), 2), w)[: x.shape[0]]


def _tied_to_activations(fn: Callable) -> Callable:
    """`fn` with its weight tied to the activation, as the dispatchers tie theirs (see
    `xla_cpu.after_activations`), so that formulations differ in their arithmetic only."""

    def run(x, w):
        leaves, treedef = jax.tree_util.tree_flatten(w)
        x, leaves = after_activations(x, *leaves)
        return fn(x, jax.tree_util.tree_unflatten(treedef, leaves))

    return run


def candidates(mode: str) -> dict[str, Callable]:
    """Formulations of `mode` keyed by name, each `f(x, weight_pytree) -> [M, out]`; "xla" first."""
    xla = {
        "int8": lambda x, w: int8_matmul(x, w.q, w.scale, implementation="xla"),
        "int4": lambda x, w: int4_matmul(x, w.packed, w.scale, w.offset, implementation="xla"),
        "w8a8": lambda x, w: w8a8_matmul(x, w.q, w.scale, implementation="xla"),
        "fp8": lambda x, w: w8a8_matmul(x, w.q, w.scale, implementation="xla"),
    }[mode]
    others = {
        "int8": {
            "split-act int8 dot": lambda x, w: split_activation_dot(x, w.q, w.scale),
            "dequant f32 dot": lambda x, w: (x @ w.q.astype(jnp.float32)) * w.scale,
            "dequant bf16 dot": lambda x, w: _two_row_dot_f32_acc(x, w.q.astype(jnp.bfloat16)) * w.scale,
        },
        "int4": {
            "split-act group dot": lambda x, w: split_activation_group_dot(x, w.packed, w.scale, w.offset),
            "dequant f32 dot": lambda x, w: x @ dequantize_int4(w.packed, w.scale, w.offset, jnp.float32),
            "dequant bf16 dot": lambda x, w: _two_row_dot_f32_acc(x, dequantize_int4(w.packed, w.scale, w.offset, jnp.bfloat16)),
        },
        "w8a8": {
            "int8 dot, 1 row unpadded": lambda x, w: _per_token_dot(x, w, _dot_i32),
            "int8->bf16 dot": lambda x, w: _per_token_dot(x, w, lambda x_q, w_q: _two_row_dot_f32_acc(x_q, w_q.astype(jnp.bfloat16))),
        },
        "fp8": {
            "fp8 dot_general": lambda x, w: _per_token_dot(x, w, _dot_f32_acc),
            "fp8->f32 dot": lambda x, w: _per_token_dot(x, w, lambda x_q, w_q: x_q.astype(jnp.float32) @ w_q.astype(jnp.float32)),
        },
    }[mode]
    return {"xla": xla, **{name: _tied_to_activations(fn) for name, fn in others.items()}}


def _chained(fn: Callable, x: jax.Array, copies: list) -> list[jax.Array]:
    """`fn(x_i, w_i)` for every copy, each x_i depending on the previous output as a layer's input does
    (so XLA can neither share work between copies nor start on a copy's weight ahead of its turn)."""
    outputs = []
    for w in copies:
        outputs.append(fn(x, w))
        x = x + 0.0 * outputs[-1][:, :1]
    return outputs


def interleaved_median_ms(calls: list[tuple[Callable, list]], x: jax.Array, *, reps: int) -> list[float]:
    """Median ms per weight copy of each `(fn, weight_copies)`: one jitted call applies `fn` to every
    copy in a chain (`_chained`). The calls take turns in a random order each round, so a load change on this shared
    machine hits all alike; the cache is flushed before each, so no call finds the weights the one
    before it read."""
    compiled = [jax.jit(functools.partial(_chained, fn)) for fn, _ in calls]
    for run, (_, copies) in zip(compiled, calls):
        jax.block_until_ready(run(x, copies))
    cache_sized = jnp.ones(CACHE_FLUSH_BYTES // 4, jnp.float32)
    read_all = jax.jit(jnp.sum)
    times = [[] for _ in calls]
    turns = np.random.default_rng(0)
    for _ in range(reps):
        # A fresh order each round: a call runs slower right after one that freed large temporaries
        # (its own temporaries then take page faults), so no formulation may always follow the same one.
        for index in turns.permutation(len(calls)):
            (_, copies), run = calls[index], compiled[index]
            jax.block_until_ready(read_all(cache_sized))
            start = time.perf_counter()
            jax.block_until_ready(run(x, copies))
            times[index].append((time.perf_counter() - start) / len(copies))
    return [1e3 * statistics.median(samples) for samples in times]


def distinct_copies(tree, count: int) -> list:
    return [jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), tree) for _ in range(count)]


def weight_bytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(tree))


def matmul_bench_parser(doc: str, rows: tuple[int, ...], shapes: tuple[str, ...], reps: int, stream_mb: float,
                        weight: str) -> argparse.ArgumentParser:
    """The options the matmul benchmarks share (this one, bench_dense_dot, bench_int8_dot): timed
    repetitions, activation row counts, weight shapes, and the megabytes of `weight` weights one
    timed call streams."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--rows", type=int, nargs="+", default=rows)
    parser.add_argument("--shapes", nargs="+", default=shapes, help="weights as INxOUT")
    parser.add_argument("--stream-mb", type=float, default=stream_mb, help=f"{weight} weight megabytes per timed call")
    return parser


def main() -> None:
    parser = matmul_bench_parser(__doc__, DEFAULT_ROWS, DEFAULT_SHAPES, reps=20, stream_mb=96.0, weight="f32")
    parser.add_argument("--modes", nargs="+", default=("int8", "int4", "w8a8", "fp8"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {args.reps} reps, median ms per matmul")
    print(f"{'weight':>11} {'M':>3} {'mode':>5}  {'formulation':<26}{'ms':>9}{'/f32':>7}{'/bf16':>7}{'MB':>7}{'GB/s':>7}")
    for shape in args.shapes:
        in_features, out_features = map(int, shape.split("x"))
        w = rng.standard_normal((in_features, out_features)).astype(np.float32) * 0.05
        copies = max(1, math.ceil(args.stream_mb * 1e6 / w.nbytes))
        w_f32 = distinct_copies(jax.device_put(w), copies)
        w_bf16 = [a.astype(jnp.bfloat16) for a in w_f32]
        quantized = {mode: distinct_copies(quantize_weight(w, mode), copies) for mode in args.modes}
        entries = [("f32", "jnp.dot", jnp.dot, w_f32), ("bf16", "jnp.dot f32 acc", _bf16_weight_dot, w_bf16)]
        for mode, weights in quantized.items():
            entries += [(mode, name, fn, weights) for name, fn in candidates(mode).items()]
        for m in args.rows:
            x = jax.device_put(rng.standard_normal((m, in_features)).astype(np.float32))
            medians = interleaved_median_ms([(fn, weights) for _, _, fn, weights in entries], x, reps=args.reps)
            f32_ms, bf16_ms = medians[:2]
            rows = [(mode, name, ms, weight_bytes(weights[0])) for (mode, name, _, weights), ms in zip(entries, medians)]
            for mode, name, ms, nbytes in rows:
                print(
                    f"{shape:>11} {m:>3} {mode:>5}  {name:<26}{ms:>9.3f}{ms / f32_ms:>7.2f}{ms / bf16_ms:>7.2f}"
                    f"{nbytes / 1e6:>7.1f}{nbytes / ms / 1e6:>7.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
