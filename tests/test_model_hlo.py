"""What XLA makes of the model's forward pass, read from the optimized HLO.

A bfloat16 model must multiply its bfloat16 weights as they are. A regression: the embedding lookup
as a column gather of the `[hidden, vocab]` table (`embed[:, tokens]` then moveaxis) led XLA:CPU to
rewrite every layer's bf16 x bf16 dot into a float32 dot over a converted copy of the weight, from
9 tokens up; a batch-16 decode of the default model ran at 98 tokens/s instead of 325 (AMD EPYC).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CHECKPOINTS_DIR
from jaxinfer.checkpoint import load_checkpoint
from jaxinfer.model.llama import LINEAR_WEIGHTS, forward
from jaxinfer.model.sharding import make_mesh, place_params


def _attend_without_cache(q, k, v, cache):
    return jnp.repeat(v, q.shape[-2] // v.shape[-2], axis=-2), cache


@pytest.mark.parametrize("num_tokens", [16, 64])
def test_bfloat16_forward_multiplies_weights_in_bfloat16(rng, num_tokens):
    checkpoint = load_checkpoint(CHECKPOINTS_DIR / "tiny-smollm2")
    params, cfg = place_params(checkpoint.params, checkpoint.config, make_mesh(1), "bfloat16")
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, num_tokens), jnp.int32)

    def run(params, tokens):
        hidden, _ = forward(params, cfg, tokens, jnp.arange(num_tokens), [None] * cfg.num_layers,
                            _attend_without_cache)
        return hidden

    hlo = jax.jit(run).lower(params, tokens).compile().as_text()
    shapes = {w.shape for layer in params["layers"] for name, w in layer.items() if name in LINEAR_WEIGHTS}
    assert all(params["layers"][0][name].dtype == jnp.bfloat16 for name in LINEAR_WEIGHTS)
    for rows, cols in shapes:
        assert not re.search(rf"f32\[{rows},{cols}\]", hlo), f"a float32 copy of a [{rows}, {cols}] weight"
    assert np.isfinite(np.asarray(run(params, tokens), np.float32)).all()
