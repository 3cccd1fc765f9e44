"""Per-input-channel scales that move activation range into the weight before quantizing it:
the `input_scale [in]` that `quantize_weight` folds into `w` (and `matmul` divides x by).

    awq_search(w [in, out], stats, group_size, alphas=ALPHA_GRID, clips=CLIP_GRID) -> AwqChoice  (int4, Lin et al. 2023)
    smoothquant_scale(w [in, out], stats, alpha=0.5) -> [in] f32       (w8a8, Xiao et al. 2022)

AWQ: s = mean|x|^alpha for alpha on a grid over [0, 1], normalized so that max(s) * min(s) = 1;
keeps the alpha whose int4 weight gives the smallest mean squared output error on the
calibration sample. Then, on the scaled weight, AWQ's clipping: per group and output channel, the
clip ratio of CLIP_GRID (1 = none) whose int4 group gives the smallest squared error of that
group's share of the output on the sample, kept only if the whole output's error is lower than
without clipping. alpha = 0 with no clipping is plain round-to-nearest and every step keeps the
best candidate, so the choice is never worse than RTN on that sample.
SmoothQuant: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), which balances the per-channel ranges
of activations and weights before both are quantized to int8.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.quant.calibration import ActivationStats
from jaxinfer.quant.quantize import best_per_entry, quantize_weight

ALPHA_GRID = tuple(np.linspace(0.0, 1.0, 21).round(2))
# AWQ's clip grid: the group's largest magnitude shrunk by up to 45% in 5% steps.
CLIP_GRID = tuple(np.linspace(1.0, 0.55, 10).round(2))
SMOOTHQUANT_ALPHA = 0.5
# Channels that never activate (zero-padded heads) would get a zero scale; they are floored at
# this fraction of the largest statistic instead.
_RELATIVE_FLOOR = 1e-5


@dataclasses.dataclass(frozen=True)
class AwqChoice:
    input_scale: np.ndarray   # [in] f32
    clip: np.ndarray          # [in/G, out] f32 in (0, 1], per group and output channel
    alpha: float
    error: float              # mean squared output error of the chosen int4 weight on the sample
    rtn_error: float          # the same for round-to-nearest (alpha = 0)


def _floored(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, np.float64)
    return np.maximum(values, max(float(values.max()), 1e-30) * _RELATIVE_FLOOR)


def _int4_error(w: jax.Array, quantized) -> jax.Array:
    return quantized.dequantize() - w


def int4_output_error(w: np.ndarray, sample: np.ndarray, input_scale: np.ndarray | None, group_size: int,
                      clip: np.ndarray | None = None) -> float:
    """Mean squared difference between `sample @ w` and the output of its int4 quantization."""
    w = jnp.asarray(w, jnp.float32)
    quantized = quantize_weight(w, "int4", input_scale=input_scale, group_size=group_size, clip=clip)
    return float(jnp.mean((jnp.asarray(sample) @ _int4_error(w, quantized)) ** 2))


def _clip_search(w: np.ndarray, sample: np.ndarray, input_scale: np.ndarray, group_size: int,
                 clips) -> np.ndarray:
    """Per (group, output channel): the ratio of `clips` with the smallest squared error of that
    group's partial output `sample[:, group] @ w[group, :]` after int4 quantization."""
    w = jnp.asarray(w, jnp.float32)
    rows, in_features = sample.shape
    groups = jnp.asarray(sample).reshape(rows, in_features // group_size, group_size)

    def candidate(ratio: float) -> tuple[jax.Array, jax.Array]:
        clip = jnp.full((in_features // group_size, w.shape[1]), ratio, jnp.float32)
        quantized = quantize_weight(w, "int4", input_scale=input_scale, group_size=group_size, clip=clip)
        error = _int4_error(w, quantized).reshape(in_features // group_size, group_size, -1)
        return clip, jnp.mean(jnp.einsum("rgi,gio->rgo", groups, error) ** 2, axis=0)

    return np.asarray(best_per_entry(map(candidate, clips)))


def awq_search(w: np.ndarray, stats: ActivationStats, group_size: int, alphas=ALPHA_GRID,
               clips=CLIP_GRID) -> AwqChoice:
    mean_abs = _floored(stats.mean_abs)
    errors = {}
    for alpha in alphas:
        scale = mean_abs ** alpha
        scale = (scale / np.sqrt(scale.max() * scale.min())).astype(np.float32)
        errors[alpha] = (int4_output_error(w, stats.sample, scale, group_size), scale)
    best = min(errors, key=lambda alpha: errors[alpha][0])
    scale = errors[best][1]
    clip = _clip_search(w, stats.sample, scale, group_size, clips)
    error = int4_output_error(w, stats.sample, scale, group_size, clip)
    if error > errors[best][0]:
        # Each group's clip was chosen on its own share of the output; their errors can add up
        # worse than none (activations correlated across groups), so no clipping is the fallback.
        clip, error = np.ones_like(clip), errors[best][0]
    rtn_error = int4_output_error(w, stats.sample, None, group_size)
    return AwqChoice(scale, clip, float(best), error, rtn_error)


def smoothquant_scale(w: np.ndarray, stats: ActivationStats, alpha: float = SMOOTHQUANT_ALPHA) -> np.ndarray:
    weight_max = _floored(np.abs(np.asarray(w, np.float32)).max(axis=1))
    return (_floored(stats.max_abs) ** alpha / weight_max ** (1 - alpha)).astype(np.float32)
