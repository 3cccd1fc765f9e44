"""Times the CPU dense matmul kernel (pallas_kernels/cpu_dense_dot) against XLA's dots on the default
model's weight shapes, for the row counts an engine step multiplies (decode batches to prefill chunks).

For every weight shape `[in -> out]` and activation row count M it prints the median ms per matmul of
    xla f32        `jnp.dot` on a float32 weight (what a float32 engine ran before the kernel)
    xla bf16       `jnp.dot` on a bfloat16 weight, float32 sums (what XLA gives a bfloat16 engine)
    kernel bf16    `dense_dot` on the bfloat16 weight: the loop this CPU runs for M rows (the FMA
                   loop; AMX-BF16 tiles from 8 rows; vdpbf16ps from 2 rows on AVX512-BF16 CPUs
                   without AMX, such as Zen 4; the GEMM loop beyond 8 rows on CPUs without
                   AVX-512)
    kernel panels  `dense_dot` on the bfloat16 weight prepacked as AMX panels (`pack_panels`; AMX
                   CPUs only), the layout a one-device bfloat16 engine stores there
    kernel f32     `dense_dot` on the float32 weight, up to cpu_dense_dot.MAX_FMA_ROWS rows
with xla bf16 / kernel bf16 (the speed-up the engine's routing buys), kernel bf16 / kernel panels
(what prepacking buys) and the rate at which each streams its weight. Weights stream from memory
as in the model's 30 layers: one jitted call walks distinct copies (`--stream-mb` of float32
weights), and calls take turns in a random order with the cache flushed before each
(bench_quant_matmul.interleaved_median_ms).

    .venv/bin/python -m benchmarks.bench_dense_dot [--rows 1 4 8 16 32 128 256] [--shapes 576x3072 ...]
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_quant_matmul import distinct_copies, interleaved_median_ms, matmul_bench_parser
from pallas_kernels import cpu_dense_dot

DEFAULT_SHAPES = ("576x960", "576x576", "576x3072", "1536x576", "576x49152")
DEFAULT_ROWS = (1, 4, 8, 16, 32, 128, 256)


def xla_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)


def kernel_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    return cpu_dense_dot.dense_dot(x.astype(w.dtype), w)


def main() -> None:
    args = matmul_bench_parser(__doc__, DEFAULT_ROWS, DEFAULT_SHAPES, reps=15, stream_mb=96.0,
                               weight="float32").parse_args()
    if not cpu_dense_dot.available():
        raise SystemExit("the CPU dense kernel does not run here (needs x86-64 with AVX2 and a C++ compiler)")
    panel = ("AMX-BF16 from 8 rows" if cpu_dense_dot.AMX_BF16 else "AVX512-BF16" if cpu_dense_dot.DP_BF16
             else "FMA, GEMM beyond 8 rows" if cpu_dense_dot.GEMM_BF16 else "FMA")
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, bfloat16 loop beyond one row: {panel}, "
          f"{args.reps} reps, median ms per matmul (GB/s of weight streamed)")
    columns = ("xla f32", "xla bf16", "kernel bf16", "kernel panels", "kernel f32")
    print(f"{'weight':>11} {'M':>4} " + " ".join(f"{c:>15}" for c in columns)
          + f" {'xla/kernel bf16':>16} {'bf16/panels':>12}")
    rng = np.random.default_rng(0)
    for shape in args.shapes:
        in_features, out_features = map(int, shape.split("x"))
        w = jax.device_put(rng.standard_normal((in_features, out_features)).astype(np.float32) * 0.05)
        copies = max(1, math.ceil(args.stream_mb * 1e6 / w.nbytes))
        w_f32 = distinct_copies(w, copies)
        w_bf16 = [a.astype(jnp.bfloat16) for a in w_f32]
        w_panels = ([cpu_dense_dot.pack_panels(a) for a in w_bf16]
                    if cpu_dense_dot.AMX_BF16 and cpu_dense_dot.packs_panels(w_bf16[0]) else None)
        for m in args.rows:
            x = jax.device_put(rng.standard_normal((m, in_features)).astype(np.float32))
            candidates = dict(zip(columns, [(xla_dot, w_f32), (xla_dot, w_bf16), (kernel_dot, w_bf16),
                                            (kernel_dot, w_panels or w_bf16), (kernel_dot, w_f32)]))
            # The kernel only where it takes these rows (float32 up to MAX_FMA_ROWS), panels where this
            # CPU packs them.
            calls = {name: (fn, weights) for name, (fn, weights) in candidates.items()
                     if fn is xla_dot
                     or (cpu_dense_dot.serves(m, weights[0]) and (name != "kernel panels" or w_panels))}
            medians = dict(zip(calls, interleaved_median_ms(list(calls.values()), x, reps=args.reps)))
            cells = []
            for name, (_, weights) in candidates.items():
                ms, nbytes = medians.get(name), weights[0].nbytes
                cells.append(f"{'-':>15}" if ms is None else f"{ms:>7.3f} ({nbytes / ms / 1e6:>4.1f})")
            speedup = medians["xla bf16"] / medians["kernel bf16"] if "kernel bf16" in medians else None
            ratio = f"{'-':>16}" if speedup is None else f"{speedup:>15.2f}x"
            packing = (f"{medians['kernel bf16'] / medians['kernel panels']:>11.2f}x" if "kernel panels" in medians
                       else f"{'-':>12}")
            print(f"{shape:>11} {m:>4} {' '.join(cells)} {ratio} {packing}", flush=True)


if __name__ == "__main__":
    main()
