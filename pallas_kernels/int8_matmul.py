"""Weight-only int8 matmul (W8A16): `x [M, K] float @ (w_q [K, N] int8 * w_scale [N]) -> [M, N] x.dtype`.

Per-output-channel scales are applied once after the K reduction (`(x @ w_q) * w_scale` equals
`x @ (w_q * w_scale)`), so the K loop only converts int8 tiles to the activation dtype.

Implementations (`int8_matmul(..., implementation=)`):
    "pallas"     the Triton-style Pallas kernel below (GPU).
    "interpret"  the same kernel in Pallas interpret mode (tests on CPU; slow).
    "xla"        the CPU formulation chosen by measurement (benchmarks/bench_quant_matmul.py, and
                 whole SmolLM2 decode steps): the activations are split into two int8 levels
                 (`activation_quant.split_per_token_int8`) for one int8 x int8 -> int32 dot over
                 2M rows (`cpu_int8_dot.fastest_int8_dot`) when that dot is the C++ kernel, or
                 when the weight is too large for its f32 copy to stay in cache (the 576x49152
                 LM-head shape: 3-5x faster there than converting); otherwise the weight is
                 converted and dotted (`xla_cpu.dequantized_dot`).
    "reference"  dequantize to float32, then an f32 dot at highest precision (the oracle).
    None         "pallas" on GPU, "xla" elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.activation_quant import merge_split_rows, split_per_token_int8
from pallas_kernels import cpu_int8_dot
from pallas_kernels.quant_tiling import accumulate_over_k, block_depth, dispatch, pallas_supports, tiled_matmul_call
from pallas_kernels.xla_cpu import after_activations, cache_resident_as_f32, dequantized_dot


def _int8_kernel(x_ref, w_ref, scale_ref, out_ref, *, block_k: int):
    def step(k, acc):
        depth = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
        x_tile = x_ref[:, depth]
        w_tile = w_ref[depth, :].astype(x_tile.dtype)
        return acc + jnp.dot(x_tile, w_tile, preferred_element_type=jnp.float32)

    acc = accumulate_over_k(x_ref.shape[1] // block_k, step, jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = (acc * scale_ref[...][None, :]).astype(out_ref.dtype)


def int8_matmul_pallas(x: jax.Array, w_q: jax.Array, w_scale: jax.Array, *, interpret: bool = False) -> jax.Array:
    kernel = functools.partial(_int8_kernel, block_k=block_depth(x.shape[1]))
    return tiled_matmul_call(kernel, [x], [w_q, w_scale.astype(jnp.float32)], out_dtype=x.dtype, interpret=interpret)


def int8_matmul_reference(x: jax.Array, w_q: jax.Array, w_scale: jax.Array) -> jax.Array:
    w = cpu_int8_dot.standard_layout(w_q).astype(jnp.float32) * w_scale.astype(jnp.float32)[None, :]
    return jnp.dot(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST).astype(x.dtype)


def split_activation_dot(x: jax.Array, w_q: jax.Array, w_scale: jax.Array) -> jax.Array:
    """`[M, N]` float32 from one int8 x int8 -> int32 dot over the two-level split of x's rows."""
    x_split, split_scale = split_per_token_int8(x)
    acc = cpu_int8_dot.fastest_int8_dot(x_split, w_q)
    return merge_split_rows(acc, split_scale) * w_scale.astype(jnp.float32)[None, :]


def int8_matmul_xla(x: jax.Array, w_q: jax.Array, w_scale: jax.Array) -> jax.Array:
    x_after, (w_q, w_scale) = after_activations(x, w_q, w_scale)
    if cpu_int8_dot.serves(2 * x.shape[0], w_q) or not cache_resident_as_f32(*cpu_int8_dot.logical_shape(w_q)):
        out = split_activation_dot(x_after, w_q, w_scale)
    else:
        out = dequantized_dot(x_after, cpu_int8_dot.standard_layout(w_q)) * w_scale.astype(jnp.float32)[None, :]
    return out.astype(x.dtype)


def int8_matmul(x: jax.Array, w_q: jax.Array, w_scale: jax.Array, *, implementation: str | None = None) -> jax.Array:
    """`x [M, K]` (f32/bf16) times int8 `w_q [K, N]` (or packed for the CPU kernel, `cpu_int8_dot.pack`)
    with per-column `w_scale [N]`; returns `[M, N]` in x.dtype."""
    run = dispatch(
        implementation,
        tileable=not cpu_int8_dot.is_packed(w_q) and pallas_supports(*w_q.shape),
        pallas=int8_matmul_pallas,
        xla=int8_matmul_xla,
        reference=int8_matmul_reference,
    )
    return run(x, w_q, w_scale)
