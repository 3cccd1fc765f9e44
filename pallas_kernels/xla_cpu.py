"""How the quantized matmuls' "xla" implementations run well on XLA:CPU (measured, see
benchmarks/bench_quant_matmul.py and the figures in each kernel module).

- `after_activations(x, *weights)`: ties weights to the activation so XLA converts them layer by
  layer instead of all at the start of the program.
- `cache_resident_as_f32(k, n)`: whether a `[K, N]` weight's float32 copy fits the cache.
- `min_rows_dot(x [M, K], w [K, N], dtype) -> [M, N] dtype`: a dot with one-row inputs padded to
  two rows: XLA:CPU runs a 1-row int8 or bf16 dot an order of magnitude slower than a 2-row one.
- `dequantized_dot(x [M, K], w [K, N]) -> [M, N] float32`: x times a weight converted to float in
  XLA (int8, fp8 or dequantized int4), in x's precision: f32 activations stay f32 (the engine's
  dtype is a promise), bf16 ones run as bf16 with f32 accumulation, except for few rows.
XLA:CPU does not fuse a weight conversion into the dot: the converted copy is written out and read
back. That is cheap when the copy stays in cache (SmolLM2's per-layer weights, 3.5 MB as f32) and
expensive when it does not (the 576x49152 LM head, 113 MB: there an int8 x int8 dot on split
activations wins, see `activation_quant.split_per_token_int8`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.quant_tiling import pad_rows

# Half of the 32 MiB L3 cache: a converted copy this small is still cached when the dot reads it.
CACHE_RESIDENT_BYTES = 16 * 2**20
# Up to this many rows an f32 dot is as fast as a bf16 one on XLA:CPU; beyond it bf16 (with f32
# accumulation) is up to 2x faster. One-row bf16 dots are an order of magnitude slower, so bf16
# activations are dotted in f32 up to here.
F32_DOT_MAX_ROWS = 16
MIN_DOT_ROWS = 2


def after_activations(x: jax.Array, *weights: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """`x` and `weights` unchanged, but XLA may not start on the weights before `x` exists.

    A weight's unpack or convert depends only on parameters, so XLA:CPU hoists all of them to the
    start of the program and keeps every converted copy live at once (117 MB of temporaries for an
    int4 SmolLM2 decode step, page-faulted afresh on each call: 3x slower). Tied to the activation,
    the copies live one layer at a time.
    """
    return lax.optimization_barrier((x, weights))


def cache_resident_as_f32(k: int, n: int) -> bool:
    """Whether the float32 copy of a `[K, N]` weight is small enough to stay in cache."""
    return 4 * k * n <= CACHE_RESIDENT_BYTES


def min_rows_dot(x: jax.Array, w: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`x [M, K] @ w [K, N]` accumulated in `dtype`, run on at least MIN_DOT_ROWS rows."""
    m = x.shape[0]
    padded = pad_rows(x, MIN_DOT_ROWS) if m < MIN_DOT_ROWS else x
    return jnp.dot(padded, w, preferred_element_type=dtype)[:m]


def dequantized_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x [M, K] @ w [K, N]` -> `[M, N]` float32, w converted in XLA to x's dtype (f32 for few rows)."""
    bf16_pays = x.dtype == jnp.bfloat16 and x.shape[0] > F32_DOT_MAX_ROWS
    dtype = jnp.bfloat16 if bf16_pays else jnp.float32
    return jnp.dot(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
