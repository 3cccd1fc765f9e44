"""The Llama-family forward pass as a pure function of (params, tokens, positions, KV cache).

Parameters are a plain pytree (dict of arrays; quantized weights are pytrees too), stored the way
they are used, `[in, out]`:

    embed       [vocab, hidden]
    final_norm  [hidden]
    lm_head     [hidden, vocab]          absent when the embeddings are tied
    layers      list (one dict per layer; a Python loop over separate weights decodes faster on
                XLA:CPU than lax.scan over stacked ones, see GUIDE.md):
        attn_norm [hidden]   wq [hidden, heads*hd]   wk, wv [hidden, kv_heads*hd]
        bq [heads*hd], bk, bv [kv_heads*hd]          only with attention_bias (Qwen2)
        wo [heads*hd, hidden]   mlp_norm [hidden]
        w_gate, w_up [hidden, intermediate]   w_down [intermediate, hidden]

Tokens may have any leading shape (`[T]` for the engine's flat ragged batch, `[B, S]` for the
contiguous reference); positions have the same shape. How K/V are cached and attended is the
caller's: `attend(q, k, v, layer_cache) -> (out, layer_cache)` with q `[..., heads, hd]`,
k/v `[..., kv_heads, hd]`, out like q. This keeps one model for the paged engine and the
contiguous-cache reference that checks it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jaxinfer.model.config import ModelConfig
from jaxinfer.model.layers import apply_rope, linear, rms_norm, rope_inverse_frequencies, swiglu_mlp

Params = dict[str, Any]
Attend = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def forward(params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array,
            kv_caches: Sequence[Any], attend: Attend) -> tuple[jax.Array, list[Any]]:
    """Runs the decoder stack; returns the final-normed hidden states `[..., hidden]` and the
    updated per-layer caches. Call `compute_logits` on the rows that need them."""
    dtype = params["final_norm"].dtype
    x = params["embed"][tokens].astype(dtype)
    inv_freq = rope_inverse_frequencies(cfg)
    new_caches = []
    for layer, cache in zip(params["layers"], kv_caches, strict=True):
        h = rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps)
        q = _project_heads(h, layer, "q", cfg.num_heads, cfg.head_dim)
        k = _project_heads(h, layer, "k", cfg.num_kv_heads, cfg.head_dim)
        v = _project_heads(h, layer, "v", cfg.num_kv_heads, cfg.head_dim)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        attn, cache = attend(q, k, v, cache)
        x = x + linear(attn.reshape(*attn.shape[:-2], -1), layer["wo"])
        h = rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps)
        x = x + swiglu_mlp(h, layer["w_gate"], layer["w_up"], layer["w_down"])
        new_caches.append(cache)
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps), new_caches


def compute_logits(params: Params, hidden: jax.Array) -> jax.Array:
    """float32 logits `[..., vocab]` from final hidden states `[..., hidden]`."""
    if "lm_head" in params:
        return linear(hidden, params["lm_head"]).astype(jnp.float32)
    # Tied embeddings: contract with the embedding table directly rather than storing a transpose.
    embed = params["embed"]
    return jnp.einsum("...h,vh->...v", hidden, embed.astype(hidden.dtype),
                      preferred_element_type=jnp.float32)


def _project_heads(h: jax.Array, layer: Params, which: str, num_heads: int, head_dim: int) -> jax.Array:
    y = linear(h, layer[f"w{which}"])
    bias = layer.get(f"b{which}")
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y.reshape(*y.shape[:-1], num_heads, head_dim)


def param_shapes(cfg: ModelConfig) -> Params:
    """The logical shape of every parameter, in the pytree structure `forward` takes."""
    h, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    layer = {"attn_norm": (h,), "wq": (h, q), "wk": (h, kv), "wv": (h, kv), "wo": (q, h),
             "mlp_norm": (h,), "w_gate": (h, inter), "w_up": (h, inter), "w_down": (inter, h)}
    if cfg.attention_bias:
        layer |= {"bq": (q,), "bk": (kv,), "bv": (kv,)}
    shapes = {"embed": (cfg.vocab_size, h), "final_norm": (h,),
              "layers": [dict(layer) for _ in range(cfg.num_layers)]}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (h, cfg.vocab_size)
    return shapes


def param_logical_axes(cfg: ModelConfig) -> Params:
    """Logical axis names of every parameter (same structure as `param_shapes`); the mapping of
    logical axes onto mesh axes lives in configs/sharding.yaml. Megatron layout: q/k/v and gate/up
    split by output (heads, mlp), o and down by input, embedding and head by vocab."""
    layer = {"attn_norm": ("embed",), "wq": ("embed", "q_heads"), "wk": ("embed", "kv_heads"),
             "wv": ("embed", "kv_heads"), "wo": ("q_heads", "embed"), "mlp_norm": ("embed",),
             "w_gate": ("embed", "mlp"), "w_up": ("embed", "mlp"), "w_down": ("mlp", "embed")}
    if cfg.attention_bias:
        layer |= {"bq": ("q_heads",), "bk": ("kv_heads",), "bv": ("kv_heads",)}
    axes = {"embed": ("vocab", "embed"), "final_norm": ("embed",),
            "layers": [dict(layer) for _ in range(cfg.num_layers)]}
    if not cfg.tie_word_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes
