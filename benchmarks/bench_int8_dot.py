"""Times the CPU int8 kernel (pallas_kernels/cpu_int8_dot) against XLA's int8 dot on the default model's
weight shapes, for the row counts an engine step multiplies (decode batches to prefill chunks).

For every weight shape `[in -> out]` and activation row count M it prints the median ms per matmul of
    xla      `lax.dot_general` of int8 x and the packed weight's `[N, K]` view, int32 sums: what
             `fastest_int8_dot` hands XLA beyond the kernel's max_rows()
    kernel   `int8_dot` on the packed weight: the loop this CPU runs for M rows (AVX-512 VNNI or
             AVX2; AMX tiles from 5 rows where the CPU has them), even past max_rows()
with their rates in int8 operations a second (2 per multiply-add) and xla / kernel. Weights stream
from memory as in the model's 30 layers: one jitted call walks distinct copies (`--stream-mb` of
int8 weights), and calls take turns in a random order with the cache flushed before each
(bench_quant_matmul.interleaved_median_ms).

    .venv/bin/python -m benchmarks.bench_int8_dot [--rows 8 16 32 64 128 256] [--shapes 576x3072 ...]
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks.bench_quant_matmul import distinct_copies, interleaved_median_ms, matmul_bench_parser
from pallas_kernels import cpu_int8_dot

DEFAULT_SHAPES = ("576x960", "576x576", "576x3072", "1536x576")
DEFAULT_ROWS = (1, 4, 8, 16, 32, 64, 128, 256)


# x arrives as float32 holding int8 values: the timing chain adds 0.0 x each output to it.
def xla_dot(x: jax.Array, w_packed: jax.Array) -> jax.Array:
    return lax.dot_general(x.astype(jnp.int8), cpu_int8_dot.output_major(w_packed), (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.int32)


def kernel_dot(x: jax.Array, w_packed: jax.Array) -> jax.Array:
    return cpu_int8_dot.int8_dot(x.astype(jnp.int8), w_packed)


def main() -> None:
    args = matmul_bench_parser(__doc__, DEFAULT_ROWS, DEFAULT_SHAPES, reps=15, stream_mb=48.0,
                               weight="int8").parse_args()
    if not cpu_int8_dot.available():
        raise SystemExit("the CPU int8 kernel does not run here (needs x86-64 with AVX2 and a C++ compiler)")
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, kernel max_rows() {cpu_int8_dot.max_rows()}, "
          f"{args.reps} reps, median ms per matmul (G int8 ops/s)")
    print(f"{'weight':>11} {'M':>4} {'xla':>16} {'kernel':>16} {'xla/kernel':>11}")
    rng = np.random.default_rng(0)
    for shape in args.shapes:
        k, n = map(int, shape.split("x"))
        w = cpu_int8_dot.pack(jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8))
        copies = distinct_copies(w, max(1, math.ceil(args.stream_mb * 1e6 / w.nbytes)))
        for m in args.rows:
            x = jax.device_put(rng.integers(-127, 128, (m, k)).astype(np.float32))
            xla_ms, kernel_ms = interleaved_median_ms([(xla_dot, copies), (kernel_dot, copies)], x,
                                                      reps=args.reps)
            ops = 2 * m * k * n
            print(f"{shape:>11} {m:>4} {xla_ms:>7.3f} ({ops / xla_ms / 1e6:>6.1f}) "
                  f"{kernel_ms:>7.3f} ({ops / kernel_ms / 1e6:>6.1f}) {xla_ms / kernel_ms:>10.2f}x", flush=True)


if __name__ == "__main__":
    main()
