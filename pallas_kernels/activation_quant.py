"""Dynamic per-token (per-row) quantization of activations, for the quantized matmuls.

- `quantize_per_token(x [M, K] float, dtype)` -> `(x_q [M, K] dtype, scale [M] float32)` with
  `x ~= scale[:, None] * x_q`; dtype int8 (symmetric, [-127, 127]) or float8_e4m3fn (|x_q| <= 448).
  This is the activation side of W8A8 (int8 or fp8).
- `split_per_token_int8(x [M, K] float)` -> `(x_q [2M, K] int8, scale [2M] float32)`: a two-level
  int8 split, `x ~= scale[:M, None] * x_q[:M] + scale[M:, None] * x_q[M:]`, with an error of at most
  `max|x_row| / 64516` per element (16-bit fixed point per row: on a par with bf16 activations
  unless a row's largest entry exceeds its typical entry 250-fold). It lets XLA:CPU run a
  weight-only int8/int4 matmul as one int8 x int8 -> int32 dot over 2M rows (the fast dot on CPU;
  the 2 rows of a decode step are also what CPU dots need to be fast). `merge_split_rows` folds the
  2M accumulated rows back into M.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

INT8_MAX = 127.0
FP8_E4M3_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)
# The second level quantizes a residual bounded by half a first-level step: 254 steps of the
# second level span one step of the first, so the residual fits [-127, 127] too.
_SECOND_LEVEL_STEPS = 2 * INT8_MAX


def _row_absmax(x: jax.Array) -> jax.Array:
    absmax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1)
    # An all-zero row quantizes to zeros with any scale; 1 avoids dividing by zero.
    return jnp.where(absmax > 0, absmax, 1.0)


def quantize_per_token(x: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """Quantizes each row of `x [M, K]` with its own scale; returns `(x_q [M, K] dtype, scale [M] f32)`."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.int8:
        scale = _row_absmax(x) / INT8_MAX
        x_q = jnp.clip(jnp.round(x.astype(jnp.float32) / scale[:, None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    elif dtype == jnp.float8_e4m3fn:
        scale = _row_absmax(x) / FP8_E4M3_MAX
        # float8_e4m3fn has no infinity: a value rounding past 448 would become NaN.
        x_q = jnp.clip(x.astype(jnp.float32) / scale[:, None], -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(jnp.float8_e4m3fn)
    else:
        raise ValueError(f"activations quantize to int8 or float8_e4m3fn, not {dtype}")
    return x_q, scale


def split_per_token_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two-level int8 split of `x [M, K]`: returns `(x_q [2M, K] int8, scale [2M] f32)` (see module doc)."""
    x = x.astype(jnp.float32)
    coarse_scale = _row_absmax(x) / INT8_MAX
    coarse = jnp.round(x / coarse_scale[:, None])
    fine_scale = coarse_scale / _SECOND_LEVEL_STEPS
    fine = jnp.round((x - coarse * coarse_scale[:, None]) / fine_scale[:, None])
    x_q = jnp.concatenate([coarse, fine]).astype(jnp.int8)
    return x_q, jnp.concatenate([coarse_scale, fine_scale])


def merge_split_rows(acc: jax.Array, scale: jax.Array) -> jax.Array:
    """Folds `acc [..., 2M, N]` (integer dots of split rows) into `[..., M, N]` float32 with `scale [2M]`."""
    m = scale.shape[0] // 2
    scaled = acc.astype(jnp.float32) * scale[:, None]
    return scaled[..., :m, :] + scaled[..., m:, :]
