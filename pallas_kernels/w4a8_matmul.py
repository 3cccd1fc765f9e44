"""W4A8 matmul: group-wise int4 weights (int4_matmul's format) times activations quantized to int8 per
group of the same G, the way llama.cpp multiplies its Q4 files (Q4_1 weights x Q8_1 activations).

    quantize_groups(x [M, K] float, G) -> (x_q [M, K/G, G] int8, scale [M, K/G] f32): each group of
        G consecutive features quantized on its own (activation_quant.quantize_per_token per group)
    w4a8_matmul(x [M, K] float, packed, scale, offset, live_rows=None) -> [M, N] x.dtype, with the
        weight in either layout: int4_matmul's (`packed [K/2, N]`, `scale`/`offset [K/G, N]`) or cpu_int4_dot's
            y[m, n] = sum_g a[m, g] scale[g, n] (x_q[m, g] . q[g, :, n]) + sum(x[m, g]) offset[g, n]
        with the group dots in exact integer arithmetic. Implementations:
            "cpu"  the C++ kernel (pallas_kernels.cpu_int4_dot) on a weight packed for it
            "xla"  one batched int8 x int8 -> int32 dot over the groups, on int4_matmul's layout
                   (any backend; the oracle the kernel is tested against)
        chosen by the weight's layout. The kernel computes only the first live_rows rows (a traced
        int32 scalar: an engine step's real tokens) and gives zeros after them.

Per-group activation scales follow outliers feature group by feature group, so unlike per-token
W8A8 this needs no SmoothQuant calibration; the weights are what a Q4_1 GGUF stores (G = 32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import cpu_int4_dot
from pallas_kernels.activation_quant import quantize_per_token
from pallas_kernels.int4_matmul import codes_by_group, offset_term


def quantize_groups(x: jax.Array, group_size: int) -> tuple[jax.Array, jax.Array]:
    """`x [M, K]` -> `(x_q [M, K/G, G] int8, scale [M, K/G] float32)`, each group quantized alone."""
    m, k = x.shape
    x_q, scale = quantize_per_token(x.reshape(m * (k // group_size), group_size), jnp.int8)
    return x_q.reshape(m, k // group_size, group_size), scale.reshape(m, k // group_size)


def w4a8_matmul_xla(x: jax.Array, packed: jax.Array, scale: jax.Array, offset: jax.Array) -> jax.Array:
    groups = scale.shape[0]
    x_q, x_scale = quantize_groups(x, x.shape[1] // groups)
    group_dots = lax.dot_general(x_q, codes_by_group(packed, groups), (((2,), (1,)), ((1,), (0,))),
                                 preferred_element_type=jnp.int32)
    scaled = group_dots.astype(jnp.float32) * x_scale.T[:, :, None] * scale.astype(jnp.float32)[:, None, :]
    return scaled.sum(axis=0) + offset_term(x, offset)


def w4a8_matmul(x: jax.Array, packed: jax.Array, scale: jax.Array, offset: jax.Array,
                live_rows: jax.Array | None = None) -> jax.Array:
    """`x [M, K]` (f32/bf16) times a W4A8 weight in either layout (module docstring) -> `[M, N]` x.dtype."""
    if cpu_int4_dot.is_packed(packed):
        return cpu_int4_dot.w4a8_dot(x, packed, scale, offset, live_rows).astype(x.dtype)
    return w4a8_matmul_xla(x, packed, scale, offset).astype(x.dtype)
