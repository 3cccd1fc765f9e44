"""8-bit weights x 8-bit activations: W8A8-INT8 and W8A8-FP8 matmuls with row and column scales.

    w8a8_matmul(x [M, K] float, w_q [K, N], w_scale [N] or [], *, implementation, live_rows=None)
        -> [M, N] x.dtype
(an int8 w_q may come packed for the CPU kernel, `cpu_int8_dot.pack`; where that kernel runs it
computes only the first live_rows rows, a traced int32 scalar, and gives zeros after them)
The activations are quantized per token (row) on the fly to the weight's dtype
(`activation_quant.quantize_per_token`), then
    out = (x_q @ w_q) * x_scale[:, None] * w_scale[None, :]
int8: int8 x int8 products accumulated exactly in int32. float8_e4m3fn: fp8 x fp8 products
accumulated in float32 (native on Hopper/Ada GPUs, emulated elsewhere). `w_scale` is per output
channel `[N]`, or one per-tensor scale `[]` (fp8 per-tensor).

    quantized_dot(x_q [M, K], w_q [K, N], *, implementation) -> [M, N] int32 (int8) / float32 (fp8)
is the unscaled core, exposed so tests can check the integer accumulation exactly.

Implementations (`implementation=`):
    "pallas"     the Triton-style Pallas kernel below (GPU), the scales applied in its epilogue. For
                 fp8 it needs Triton's fp8 dot (compute capability 8.9+: Ada, Hopper); elsewhere
                 None picks "xla" for fp8 weights.
    "interpret"  the same kernel in Pallas interpret mode (tests on CPU; slow).
    "xla"        the fastest CPU formulation measured (benchmarks/bench_quant_matmul.py): int8
                 through `cpu_int8_dot.fastest_int8_dot` (the C++ kernel for few rows where the CPU
                 has AVX2, VNNI or AMX, else XLA's int32-accumulating dot; where the kernel serves, `w8a8_matmul`
                 makes one `cpu_int8_dot.w8a8_dot` call of quantization, dot and scales); fp8
                 converted to bf16 (exact) and dotted with f32 accumulation (`xla_cpu.min_rows_dot`).
    "reference"  exact integer (int8) / highest-precision f32 (fp8) math, then the scales.
    None         "pallas" on GPU, "xla" elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.activation_quant import quantize_per_token
from pallas_kernels import cpu_int8_dot
from pallas_kernels.quant_tiling import (
    accumulate_over_k,
    block_depth,
    check_tileable_weight,
    dispatch,
    pallas_supports,
    resolve_implementation,
    tiled_matmul_call,
)
from pallas_kernels.xla_cpu import after_activations, min_rows_dot

# Triton multiplies float8_e4m3fn tiles natively from compute capability 8.9 (Ada, Hopper) on.
_FP8_DOT_MIN_COMPUTE_CAPABILITY = 8.9


def accumulator_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """int32 for int8 operands, float32 for float8_e4m3fn ones."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.int8:
        return jnp.dtype(jnp.int32)
    if dtype == jnp.float8_e4m3fn:
        return jnp.dtype(jnp.float32)
    raise ValueError(f"W8A8 weights are int8 or float8_e4m3fn, not {dtype}")


def gpu_has_fp8_dot() -> bool:
    """Whether the default device is a GPU whose tensor cores multiply fp8 (else fp8 runs through XLA)."""
    compute_capability = getattr(jax.devices()[0], "compute_capability", None)
    return compute_capability is not None and float(compute_capability) >= _FP8_DOT_MIN_COMPUTE_CAPABILITY


def _pallas_can_run(w_q: jax.Array) -> bool:
    return (not cpu_int8_dot.is_packed(w_q) and pallas_supports(*w_q.shape)
            and (w_q.dtype != jnp.float8_e4m3fn or gpu_has_fp8_dot()))


def _w8a8_kernel(x_ref, *refs, block_k: int, scaled: bool):
    if scaled:
        x_scale_ref, w_ref, w_scale_ref, out_ref = refs
    else:
        w_ref, out_ref = refs
    acc_dtype = accumulator_dtype(w_ref.dtype)

    def step(k, acc):
        depth = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
        return acc + jnp.dot(x_ref[:, depth], w_ref[depth, :], preferred_element_type=acc_dtype)

    acc = accumulate_over_k(x_ref.shape[1] // block_k, step, jnp.zeros(out_ref.shape, acc_dtype))
    if scaled:
        acc = acc.astype(jnp.float32) * x_scale_ref[...][:, None] * w_scale_ref[...][None, :]
    out_ref[...] = acc.astype(out_ref.dtype)


def _pallas_call(x_q, w_q, scales, out_dtype, *, interpret: bool = False):
    check_tileable_weight(w_q)  # before the scale is shaped by it
    kernel = functools.partial(_w8a8_kernel, block_k=block_depth(x_q.shape[1]), scaled=scales is not None)
    if scales is None:
        return tiled_matmul_call(kernel, [x_q], [w_q], out_dtype=out_dtype, interpret=interpret)
    x_scale, w_scale = scales
    w_scale = jnp.broadcast_to(w_scale.astype(jnp.float32), (w_q.shape[1],))
    return tiled_matmul_call(kernel, [x_q, x_scale], [w_q, w_scale], out_dtype=out_dtype, interpret=interpret)


def quantized_dot_reference(x_q: jax.Array, w_q: jax.Array) -> jax.Array:
    acc_dtype = accumulator_dtype(w_q.dtype)
    w_q = cpu_int8_dot.standard_layout(w_q)
    return jnp.dot(x_q.astype(acc_dtype), w_q.astype(acc_dtype), precision=lax.Precision.HIGHEST)


def quantized_dot_xla(x_q: jax.Array, w_q: jax.Array) -> jax.Array:
    if w_q.dtype == jnp.int8:
        return cpu_int8_dot.fastest_int8_dot(x_q, w_q)
    # Every float8_e4m3fn value is exact in bf16: an exact emulation of the fp8 dot.
    x_q, (w_q,) = after_activations(x_q, w_q)
    return min_rows_dot(x_q.astype(jnp.bfloat16), w_q.astype(jnp.bfloat16), jnp.float32)


def _then_scale(quantized_dot_fn):
    """A `(x_q, w_q, scales, out_dtype)` implementation from an unscaled dot: scales applied after it."""

    def run(x_q, w_q, scales, out_dtype):
        acc = quantized_dot_fn(x_q, w_q)
        if scales is None:
            return acc
        x_scale, w_scale = scales
        return (acc.astype(jnp.float32) * x_scale[:, None] * w_scale.astype(jnp.float32)).astype(out_dtype)

    return run


def _implementation(implementation: str | None, w_q: jax.Array):
    """`f(x_q, w_q, scales: (x_scale, w_scale) | None, out_dtype)` for the implementation named."""
    return dispatch(
        implementation,
        tileable=_pallas_can_run(w_q),
        pallas=_pallas_call,
        xla=_then_scale(quantized_dot_xla),
        reference=_then_scale(quantized_dot_reference),
    )


def quantized_dot(x_q: jax.Array, w_q: jax.Array, *, implementation: str | None = None) -> jax.Array:
    """Unscaled `x_q [M, K] @ w_q [K, N]` in the accumulator dtype (int32 for int8, f32 for fp8)."""
    return _implementation(implementation, w_q)(x_q, w_q, None, accumulator_dtype(w_q.dtype))


def w8a8_matmul(x: jax.Array, w_q: jax.Array, w_scale: jax.Array, *, implementation: str | None = None,
                live_rows: jax.Array | None = None) -> jax.Array:
    """`x [M, K]` (f32/bf16) quantized per token to `w_q.dtype`, times `w_q [K, N]`, rescaled -> `[M, N]` x.dtype
    (rows from live_rows on zero where the CPU kernel runs, module docstring)."""
    fused = resolve_implementation(implementation, tileable=_pallas_can_run(w_q)) == "xla" and cpu_int8_dot.serves(
        x.shape[0], w_q)
    if fused:  # quantization, dot and scales in one CPU kernel call (cpu_int8_dot.w8a8_dot)
        return cpu_int8_dot.w8a8_dot(x, w_q, w_scale, live_rows).astype(x.dtype)
    x_q, x_scale = quantize_per_token(x, w_q.dtype)
    return _implementation(implementation, w_q)(x_q, w_q, (x_scale, w_scale), x.dtype)
