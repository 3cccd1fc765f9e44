"""The Python side of cpu_row_passes.h: calls of a CPU matmul kernel that take the layer's next
operations through a pass over the product's rows (cpu_dense_dot, cpu_int4_dot, cpu_int8_dot). Each
kernel passes its own operands (x, its weight's arrays) first, already checked; the pass's operands
follow, then the `live` row count (`cpu_ffi.live_row_operand`):

    add_norm(target, operands, live, n, residual [M, N] f32, norm_weight [N], eps, act_dtype)
        -> (residual + x w [M, N] f32, its RMSNorm times norm_weight [M, N] act_dtype)
           the residual's buffer reused for the sum
    qkv_rope(target, operands, live, n, cos, sin [M, D / 2] f32, kv_heads, q_per_kv, act_dtype)
        -> (q [M, kv_heads * q_per_kv * D], k, v [M, kv_heads * D]) act_dtype, q and k rotated;
           n = kv_heads * (q_per_kv + 2) * D outputs, D / 2 a multiple of LANE
    swiglu(target, operands, live, n, act_dtype) -> silu(gate) * up [M, n / 2] act_dtype, n / 2 a
           multiple of LANE

M is x's (`operands[0]`) rows and n the weight's outputs. The ValueErrors name the call (`target`)
and the operand at fault.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# The passes read whole 16-float vectors (8 in AVX2 builds): D / 2 and F must be multiples of this.
LANE = 16


def add_norm(target: str, operands: tuple, live: jax.Array, n: int, residual: jax.Array, norm_weight: jax.Array,
             eps: float, act_dtype) -> tuple[jax.Array, jax.Array]:
    m = operands[0].shape[0]
    if residual.shape != (m, n) or residual.dtype != jnp.float32 or norm_weight.shape != (n,) or n % LANE:
        raise ValueError(f"{target} takes a float32 residual [M, N] and a norm weight [N] for the weight's N = {n} "
                         f"outputs (a multiple of {LANE}); got {residual.shape} {residual.dtype} and "
                         f"{norm_weight.shape} for x of {m} rows")
    out = (jax.ShapeDtypeStruct((m, n), jnp.float32), jax.ShapeDtypeStruct((m, n), act_dtype))
    return jax.ffi.ffi_call(target, out, input_output_aliases={len(operands): 0})(
        *operands, residual, norm_weight, live, eps=np.float32(eps))


def qkv_rope(target: str, operands: tuple, live: jax.Array, n: int, cos: jax.Array, sin: jax.Array,
             kv_heads: int, q_per_kv: int, act_dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    m, half = operands[0].shape[0], cos.shape[-1]
    head_dim = 2 * half
    if not (n == kv_heads * (q_per_kv + 2) * head_dim and half % LANE == 0
            and cos.shape == sin.shape == (m, half) and cos.dtype == sin.dtype == jnp.float32):
        raise ValueError(f"{target} takes a weight of kv_heads * (q_per_kv + 2) * D outputs and float32 cos and sin "
                         f"[M, D / 2], D / 2 a multiple of {LANE}; got {n} outputs for {kv_heads} kv heads of "
                         f"{q_per_kv} query heads, and {cos.shape} {cos.dtype}, {sin.shape} {sin.dtype}")
    kv = jax.ShapeDtypeStruct((m, kv_heads * head_dim), act_dtype)
    out = (jax.ShapeDtypeStruct((m, kv_heads * q_per_kv * head_dim), act_dtype), kv, kv)
    return jax.ffi.ffi_call(target, out)(*operands, cos, sin, live, kv_heads=np.int64(kv_heads),
                                         q_per_kv=np.int64(q_per_kv))


def swiglu(target: str, operands: tuple, live: jax.Array, n: int, act_dtype) -> jax.Array:
    if n % (2 * LANE):
        raise ValueError(f"{target} takes a gate_up weight of 2F outputs, F a multiple of {LANE}; got {n}")
    out = jax.ShapeDtypeStruct((operands[0].shape[0], n // 2), act_dtype)
    return jax.ffi.ffi_call(target, out)(*operands, live)
