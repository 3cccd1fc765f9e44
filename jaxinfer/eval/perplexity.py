"""Perplexity and KL divergence of a model over fixed token windows: pure functions of params.

    causal_hidden(params, cfg, tokens [B, S] int32, kv_dtype=None) -> final hidden states [B, S, hidden]
    window_log_probs(params, cfg, tokens [B, S], kv_dtype=None) -> next-token log-probabilities [B, S, vocab] f32
    evaluate(params, cfg, windows [N, S], reference_params=None, batch_size=1, kv_dtype=None) -> Evaluation

kv_dtype (a KV pool dtype name, jaxinfer.cache.kv_pool) rounds every K/V row as an engine's pool of
that dtype stores it before attention reads it; None keeps them in the params' dtype. The
reference model's K/V are never rounded.

Each window is scored on its own, from position 0 (a fresh causal context): token t+1 is
predicted from tokens 0..t, so a window of S tokens contributes S-1 predictions. Perplexity is
exp(mean NLL) over all predictions; the KL divergence KL(reference || model) of the next-token
distributions is averaged over the same predictions (the reference is the unquantized model).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.cache.kv_pool import as_stored
from jaxinfer.model.config import ModelConfig
from jaxinfer.model.llama import compute_logits, forward
from jaxinfer.reference import ContiguousKV, contiguous_attend


@dataclasses.dataclass(frozen=True)
class Evaluation:
    perplexity: float
    mean_nll: float
    mean_kl: float | None   # None without a reference model
    num_predictions: int


def causal_hidden(params, cfg: ModelConfig, tokens: jax.Array, kv_dtype: str | None = None) -> jax.Array:
    """The model over whole windows `[B, S]` with dense causal attention (a contiguous cache of
    exactly S positions, written once), K/V rounded as a pool of kv_dtype stores them."""
    batch, seq = tokens.shape
    dtype = params["final_norm"].dtype
    cache_shape = (batch, seq, cfg.num_kv_heads, cfg.head_dim)
    caches = [ContiguousKV(jnp.zeros(cache_shape, dtype), jnp.zeros(cache_shape, dtype))
              for _ in range(cfg.num_layers)]
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), tokens.shape)

    def attend(q, k, v, cache):
        if kv_dtype is not None:
            k, v = as_stored(k, kv_dtype), as_stored(v, kv_dtype)
        return contiguous_attend(q, k, v, cache, start=jnp.int32(0), sm_scale=cfg.head_dim ** -0.5)

    hidden, _ = forward(params, cfg, tokens, positions, caches, attend)
    return hidden


@functools.partial(jax.jit, static_argnums=(1, 3))
def window_log_probs(params, cfg: ModelConfig, tokens: jax.Array, kv_dtype: str | None = None) -> jax.Array:
    return jax.nn.log_softmax(compute_logits(params, causal_hidden(params, cfg, tokens, kv_dtype)), axis=-1)


@jax.jit
def _prediction_nll(log_probs: jax.Array, tokens: jax.Array) -> jax.Array:
    """NLL `[B, S-1]` of tokens 1..S-1 under the predictions made at positions 0..S-2."""
    return -jnp.take_along_axis(log_probs[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]


@jax.jit
def _prediction_kl(log_probs: jax.Array, reference_log_probs: jax.Array) -> jax.Array:
    """KL(reference || model) `[B, S-1]` at the positions that predict a token."""
    reference = reference_log_probs[:, :-1]
    return jnp.sum(jnp.exp(reference) * (reference - log_probs[:, :-1]), axis=-1)


def evaluate(params, cfg: ModelConfig, windows: np.ndarray, reference_params=None,
             batch_size: int = 1, kv_dtype: str | None = None) -> Evaluation:
    """Perplexity of `params` over `windows [N, S]` int32, its K/V rounded as a pool of kv_dtype
    stores them, and the mean KL against `reference_params` (same config) when given."""
    nll_sum, kl_sum, count = 0.0, 0.0, 0
    for start in range(0, len(windows), batch_size):
        tokens = jnp.asarray(windows[start:start + batch_size], dtype=jnp.int32)
        log_probs = window_log_probs(params, cfg, tokens, kv_dtype)
        nll_sum += float(jnp.sum(_prediction_nll(log_probs, tokens)))
        count += tokens.shape[0] * (tokens.shape[1] - 1)
        if reference_params is not None:
            kl_sum += float(jnp.sum(_prediction_kl(log_probs, window_log_probs(reference_params, cfg, tokens))))
    mean_nll = nll_sum / count
    return Evaluation(math.exp(mean_nll), mean_nll, kl_sum / count if reference_params is not None else None, count)
