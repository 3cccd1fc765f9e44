"""Calibration activations: what enters each linear weight when the float model reads text.

    capture_activations(params, cfg, windows [N, S] int32, sample_rows=256) -> Calibration
    Calibration[(layer index, weight name)] -> ActivationStats of that weight's input [rows, in]

The model runs eagerly with every linear weight wrapped in a recorder whose `matmul` (the hook
`jaxinfer.model.layers.linear` calls for non-array weights) notes its input and then multiplies
by the float weight, so the forward pass itself is unchanged. AWQ needs a sample of input rows
(its scale search minimizes the output error on them); SmoothQuant needs per-channel maxima; the
fp8 scale search weighs each input channel's weight error by the mean square of its activations.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.eval.perplexity import causal_hidden
from jaxinfer.model.config import ModelConfig
from jaxinfer.model.layers import linear
from jaxinfer.model.llama import LINEAR_WEIGHTS


@dataclasses.dataclass(frozen=True)
class ActivationStats:
    """Per-input-channel statistics of the activations `x [rows, in]` entering one weight."""

    mean_abs: np.ndarray   # [in] f32, over every calibration row
    max_abs: np.ndarray    # [in] f32, over every calibration row
    mean_square: np.ndarray  # [in] f32, over every calibration row
    sample: np.ndarray     # [sample_rows, in] f32, rows drawn evenly from every window


Calibration = dict[tuple[int, str], ActivationStats]


class _Accumulator:
    def __init__(self, rows_per_window: int, rng: np.random.Generator):
        self.rows_per_window, self.rng = rows_per_window, rng
        self.abs_sum, self.square_sum, self.max_abs, self.count, self.samples = 0.0, 0.0, 0.0, 0, []

    def add(self, x: np.ndarray) -> None:
        magnitude = np.abs(x)
        self.abs_sum = self.abs_sum + magnitude.sum(axis=0)
        self.square_sum = self.square_sum + np.square(magnitude, dtype=np.float64).sum(axis=0)
        self.max_abs = np.maximum(self.max_abs, magnitude.max(axis=0))
        self.count += len(x)
        self.samples.append(x[self.rng.choice(len(x), min(self.rows_per_window, len(x)), replace=False)])

    def stats(self) -> ActivationStats:
        return ActivationStats((self.abs_sum / self.count).astype(np.float32), self.max_abs.astype(np.float32),
                               (self.square_sum / self.count).astype(np.float32),
                               np.concatenate(self.samples).astype(np.float32))


@dataclasses.dataclass(frozen=True)
class _RecordingWeight:
    weight: jax.Array
    accumulator: _Accumulator

    def matmul(self, x: jax.Array) -> jax.Array:
        self.accumulator.add(np.asarray(x, np.float32).reshape(-1, x.shape[-1]))
        return linear(x, self.weight)


def capture_activations(params, cfg: ModelConfig, windows: np.ndarray, sample_rows: int = 256,
                        seed: int = 0) -> Calibration:
    """Runs the float model over `windows [N, S]` one window at a time and returns the input
    statistics of every linear weight of every layer."""
    rng = np.random.default_rng(seed)
    rows_per_window = max(1, sample_rows // len(windows))
    accumulators = {(i, name): _Accumulator(rows_per_window, rng)
                    for i in range(cfg.num_layers) for name in LINEAR_WEIGHTS}
    recording = {**params, "layers": [
        {name: _RecordingWeight(jnp.asarray(w), accumulators[(i, name)]) if name in LINEAR_WEIGHTS else jnp.asarray(w)
         for name, w in layer.items()} for i, layer in enumerate(params["layers"])]}
    recording = {k: (v if k == "layers" else jnp.asarray(v)) for k, v in recording.items()}
    for window in windows:
        causal_hidden(recording, cfg, jnp.asarray(window[None], dtype=jnp.int32))
    return {key: accumulator.stats() for key, accumulator in accumulators.items()}
