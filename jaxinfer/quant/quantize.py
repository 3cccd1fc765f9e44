"""Weight quantizers: a float `w [in, out]` -> a quantized weight pytree (see `jaxinfer.quant.weights`).

    quantize_weight(w [in, out] float, mode, **options) -> Int8Weight | Int4Weight | W8A8Weight | W4A8Weight

| mode   | result                    | options                                                      |
| ------ | ------------------------- | ------------------------------------------------------------ |
| "int8" | Int8Weight (W8A16)        | input_scale                                                  |
| "int4" | Int4Weight (W4A16)        | group_size (default 128, or 64 when in % 128 != 0), input_scale, clip |
| "w8a8" | W8A8Weight, int8          | input_scale (SmoothQuant smoothing factors)                  |
| "fp8"  | W8A8Weight, float8_e4m3fn | per_channel (default True; False: one per-tensor scale), input_scale, importance |
| "w4a8" | W4A8Weight                | as "int4"                                                    |

All round to nearest. int8 and w8a8 are symmetric per output channel (`scale = max|w[:, n]| / 127`);
int4 and w4a8 are asymmetric per group of `group_size` input rows (`scale = (max - min) / 15`,
`offset = min`, both stored as float16 and used exactly as stored); `clip [in/G, out]` in (0, 1]
(AWQ's clipping) first clamps each group to +-clip * max|group|, trading the saturated outliers
for a finer step.
fp8 without `importance` scales so that the largest magnitude maps to 448, the largest
float8_e4m3fn. With `importance [in]` (the mean square
of each input channel's activations, from calibration) it picks, per channel (or for the tensor),
the scale among FP8_SCALE_CANDIDATES that map the largest magnitude to 448 * 2^(-k/16), k < 16,
with the smallest importance-weighted squared error: e4m3's relative grid repeats every octave,
so one octave of candidates covers every alignment of the weights with it.
`input_scale [in]` (positive; AWQ / SmoothQuant) is folded in:
the quantized matrix is `input_scale[:, None] * w`, and the weight's `matmul` divides x by it.
Quantization runs eagerly at build time (it validates `input_scale` values), not under `jit`.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.quant.weights import Int4Weight, Int8Weight, QuantizedWeight, W4A8Weight, W8A8Weight
from pallas_kernels.activation_quant import FP8_E4M3_MAX, INT8_MAX
from pallas_kernels.int4_matmul import INT4_LEVELS, pack_int4

DEFAULT_GROUP_SIZE = 128
FP8_SCALE_CANDIDATES = 16
SMALL_GROUP_SIZE = 64
# w4a8 groups: llama.cpp's Q4/Q8 block (jaxinfer.quant.weights).
W4A8_GROUP_SIZE = 32


def _nonzero(scale: jax.Array) -> jax.Array:
    # An all-zero channel quantizes to zeros with any scale; 1 keeps the division finite.
    return jnp.where(scale > 0, scale, 1.0)


def _prepare(w: jax.Array, input_scale: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """`w` as float32 with `input_scale` folded into its rows; checks both shapes."""
    if w.ndim != 2:
        raise ValueError(f"quantize_weight takes a 2-D [in, out] weight, got shape {w.shape}")
    w = jnp.asarray(w, jnp.float32)
    if input_scale is None:
        return w, None
    input_scale = jnp.asarray(input_scale, jnp.float32)
    if input_scale.shape != (w.shape[0],):
        raise ValueError(f"input_scale must have shape [in] = ({w.shape[0]},), got {input_scale.shape}")
    if not bool(jnp.all(input_scale > 0) & jnp.all(jnp.isfinite(input_scale))):
        raise ValueError("input_scale must be positive and finite (it divides the activations)")
    return w * input_scale[:, None], input_scale


def _int8_per_channel(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    scale = _nonzero(jnp.max(jnp.abs(w), axis=0) / INT8_MAX)
    q = jnp.clip(jnp.round(w / scale[None, :]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return q, scale


def quantize_int8(w: jax.Array, *, input_scale: jax.Array | None = None) -> Int8Weight:
    w, input_scale = _prepare(w, input_scale)
    return Int8Weight(*_int8_per_channel(w), input_scale=input_scale)


def quantize_w8a8(w: jax.Array, *, input_scale: jax.Array | None = None) -> W8A8Weight:
    w, input_scale = _prepare(w, input_scale)
    return W8A8Weight(*_int8_per_channel(w), input_scale=input_scale)


def _fp8_round_trip(w: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(q, q * scale)`: `w / scale` as float8_e4m3fn and the weight it stands for."""
    # float8_e4m3fn has no infinity: a value rounding past 448 would become NaN.
    q = jnp.clip(w / scale, -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(jnp.float8_e4m3fn)
    return q, q.astype(jnp.float32) * scale


def _searched_fp8_scale(w: jax.Array, absmax: jax.Array, importance: jax.Array) -> jax.Array:
    """The candidate scale (per entry of `absmax`) with the smallest `importance`-weighted error.

    Per channel the error is summed over the input rows; a per-tensor `absmax []` sums it over
    the whole weight. Light-tailed weights (SmolLM2's) lose most to e4m3's coarse top octave, so
    where the largest magnitude lands on the grid decides much of the error.
    """
    def candidate(k: int) -> tuple[jax.Array, jax.Array]:
        scale = _nonzero(absmax / (FP8_E4M3_MAX * 2.0 ** (-k / FP8_SCALE_CANDIDATES)))
        _, restored = _fp8_round_trip(w, scale)
        error = jnp.sum(importance[:, None] * (w - restored) ** 2, axis=0)
        return scale, error if absmax.ndim else jnp.sum(error)

    return best_per_entry(map(candidate, range(FP8_SCALE_CANDIDATES)))


def best_per_entry(candidates: Iterable[tuple[jax.Array, jax.Array]]) -> jax.Array:
    """Of `(value, error)` pairs of one shape, each entry's value where its error is smallest
    (the first candidate on ties): a grid search run for every channel or group at once."""
    best_value, best_error = None, None
    for value, error in candidates:
        if best_value is None:
            best_value, best_error = value, error
        else:
            better = error < best_error
            best_value, best_error = jnp.where(better, value, best_value), jnp.where(better, error, best_error)
    return best_value


def quantize_fp8(w: jax.Array, *, per_channel: bool = True, input_scale: jax.Array | None = None,
                 importance: jax.Array | None = None) -> W8A8Weight:
    w, input_scale = _prepare(w, input_scale)
    absmax = jnp.max(jnp.abs(w), axis=0) if per_channel else jnp.max(jnp.abs(w))
    if importance is None:
        scale = _nonzero(absmax / FP8_E4M3_MAX)
    else:
        importance = jnp.asarray(importance, jnp.float32)
        if importance.shape != (w.shape[0],):
            raise ValueError(f"importance must have shape [in] = ({w.shape[0]},), got {importance.shape}")
        # The quantized matrix multiplies x / input_scale, whose mean square is importance / input_scale^2.
        if input_scale is not None:
            importance = importance / input_scale ** 2
        scale = _searched_fp8_scale(w, absmax, importance)
    return W8A8Weight(_fp8_round_trip(w, scale)[0], scale, input_scale=input_scale)


def default_group_size(in_features: int) -> int:
    """128, or 64 where 128 does not divide the input size (SmolLM2's hidden size 576)."""
    for group_size in (DEFAULT_GROUP_SIZE, SMALL_GROUP_SIZE):
        if in_features % group_size == 0:
            return group_size
    raise ValueError(
        f"int4 needs the input size to be a multiple of the group size; {in_features} is not a multiple of "
        f"{DEFAULT_GROUP_SIZE} or {SMALL_GROUP_SIZE}: pass group_size= an even divisor of it"
    )


def quantize_int4(
    w: jax.Array, *, group_size: int | None = None, input_scale: jax.Array | None = None,
    clip: jax.Array | None = None,
) -> Int4Weight:
    w, input_scale = _prepare(w, input_scale)
    in_features, out_features = w.shape
    group_size = default_group_size(in_features) if group_size is None else group_size
    if group_size < 2 or group_size % 2 or in_features % group_size:
        raise ValueError(
            f"int4 group_size must be even and divide the input size {in_features}, got {group_size}"
        )
    groups = w.reshape(in_features // group_size, group_size, out_features)
    low, high = jnp.min(groups, axis=1), jnp.max(groups, axis=1)
    if clip is not None:
        clip = jnp.asarray(clip, jnp.float32)
        if clip.shape != low.shape:
            raise ValueError(f"clip must have shape [in/G, out] = {low.shape}, got {clip.shape}")
        bound = clip * jnp.maximum(-low, high)
        # both ends clipped into [-bound, bound]: a group of one sign has one end outside it
        low, high = jnp.clip(low, -bound, bound), jnp.clip(high, -bound, bound)
    # Rounded to float16 before the codes are chosen, so the codes fit the scales actually stored
    # (and guarded after the rounding: a range under float16's smallest step would store 0).
    scale = _nonzero(((high - low) / (INT4_LEVELS - 1)).astype(jnp.float16).astype(jnp.float32)).astype(jnp.float16)
    offset = low.astype(jnp.float16)
    clamped = jnp.clip(groups, low[:, None, :], high[:, None, :])  # a clipped group's values, and a flat one's
    codes = jnp.round((clamped - offset.astype(jnp.float32)[:, None, :]) / scale.astype(jnp.float32)[:, None, :])
    codes = jnp.clip(codes, 0, INT4_LEVELS - 1).reshape(in_features, out_features)
    return Int4Weight(pack_int4(codes, group_size), scale, offset, input_scale=input_scale)


def quantize_w4a8(w: jax.Array, *, group_size: int = W4A8_GROUP_SIZE, **options) -> W4A8Weight:
    int4 = quantize_int4(w, group_size=group_size, **options)
    return W4A8Weight(int4.packed, int4.scale, int4.offset, input_scale=int4.input_scale)


_QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4, "w8a8": quantize_w8a8, "fp8": quantize_fp8,
               "w4a8": quantize_w4a8}
MODES = tuple(_QUANTIZERS)


def quantize_weight(w: jax.Array | np.ndarray, mode: str, **options) -> QuantizedWeight:
    """Quantizes a float `w [in, out]` in `mode` ("int8", "int4", "w8a8", "fp8", "w4a8"); options per the module table."""
    if mode not in _QUANTIZERS:
        raise ValueError(f"unknown quantization mode {mode!r}; choose one of {MODES}")
    return _QUANTIZERS[mode](w, **options)
