"""Per-input-channel scales that move activation range into the weight before quantizing it:
the `input_scale [in]` that `quantize_weight` folds into `w` (and `matmul` divides x by).

    awq_search(w [in, out], stats, group_size, alphas=ALPHA_GRID) -> AwqChoice      (int4, Lin et al. 2023)
    smoothquant_scale(w [in, out], stats, alpha=0.5) -> [in] f32       (w8a8, Xiao et al. 2022)

AWQ: s = mean|x|^alpha for alpha on a grid over [0, 1], normalized so that max(s) * min(s) = 1;
keeps the alpha whose int4 weight gives the smallest mean squared output error on the
calibration sample. alpha = 0 is plain round-to-nearest, so the choice is never worse than RTN on
that sample. SmoothQuant: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), which balances the
per-channel ranges of activations and weights before both are quantized to int8.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxinfer.quant.calibration import ActivationStats
from jaxinfer.quant.quantize import quantize_weight

ALPHA_GRID = tuple(np.linspace(0.0, 1.0, 11).round(2))
SMOOTHQUANT_ALPHA = 0.5
# Channels that never activate (zero-padded heads) would get a zero scale; they are floored at
# this fraction of the largest statistic instead.
_RELATIVE_FLOOR = 1e-5


@dataclasses.dataclass(frozen=True)
class AwqChoice:
    input_scale: np.ndarray   # [in] f32
    alpha: float
    error: float              # mean squared output error of the chosen int4 weight on the sample
    rtn_error: float          # the same for round-to-nearest (alpha = 0)


def _floored(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, np.float64)
    return np.maximum(values, max(float(values.max()), 1e-30) * _RELATIVE_FLOOR)


def int4_output_error(w: np.ndarray, sample: np.ndarray, input_scale: np.ndarray | None, group_size: int) -> float:
    """Mean squared difference between `sample @ w` and the output of its int4 quantization."""
    x, w = jnp.asarray(sample), jnp.asarray(w, jnp.float32)
    quantized = quantize_weight(w, "int4", input_scale=input_scale, group_size=group_size).dequantize()
    return float(jnp.mean((x @ quantized - x @ w) ** 2))


def awq_search(w: np.ndarray, stats: ActivationStats, group_size: int, alphas=ALPHA_GRID) -> AwqChoice:
    mean_abs = _floored(stats.mean_abs)
    errors = {}
    for alpha in alphas:
        scale = mean_abs ** alpha
        scale = (scale / np.sqrt(scale.max() * scale.min())).astype(np.float32)
        errors[alpha] = (int4_output_error(w, stats.sample, scale, group_size), scale)
    best = min(errors, key=lambda alpha: errors[alpha][0])
    rtn_error = int4_output_error(w, stats.sample, None, group_size)
    return AwqChoice(errors[best][1], float(best), errors[best][0], rtn_error)


def smoothquant_scale(w: np.ndarray, stats: ActivationStats, alpha: float = SMOOTHQUANT_ALPHA) -> np.ndarray:
    weight_max = _floored(np.abs(np.asarray(w, np.float32)).max(axis=1))
    return (_floored(stats.max_abs) ** alpha / weight_max ** (1 - alpha)).astype(np.float32)
