"""The Llama-family forward pass as a pure function of (params, tokens, positions, KV cache).

Parameters are a plain pytree (dict of arrays; quantized weights are pytrees too), stored the way
they are used, `[in, out]`:

    embed       [hidden, vocab]          the token embeddings as columns: tied models use the table
                                         as their head, and a matrix-vector product over [in, out]
                                         streams faster on XLA:CPU than over its transpose
    final_norm  [hidden]
    lm_head     [hidden, vocab]          absent when the embeddings are tied (except in quantized
                                         engines, which may quantize a copy of the table: jaxinfer.quant)
    layers      list (one dict per layer; a Python loop over separate weights decodes faster on
                XLA:CPU than lax.scan over stacked ones, 1.3-2.7x):
        attn_norm [hidden]
        w_qkv     [hidden, kv_heads * (q_per_kv + 2) * hd]   q, k and v in one matmul
        b_qkv     [kv_heads * (q_per_kv + 2) * hd]           only with attention_bias (Qwen2)
        wo [heads*hd, hidden]   mlp_norm [hidden]
        w_gate_up [hidden, intermediate * 2]                 gate and up in one matmul
        w_down    [intermediate, hidden]

One matmul where checkpoints store two or three: at batch 1 a few large matrix-vector products
stream weights faster than many small ones (the batch-1 step is about 7% faster on XLA:CPU), and
GPUs launch fewer kernels. The fused output axes are ordered so that tensor parallelism can split
them evenly: w_qkv by KV-head group (for KV head g: its q_per_kv query heads, then k_g, then v_g),
w_gate_up by intermediate unit (gate_i, up_i side by side). `fuse_projections` packs a
checkpoint's separate weights this way.

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
import numpy as np

from jaxinfer.model.config import ModelConfig
from jaxinfer.model.layers import (apply_rope, embedding_columns, linear, residual_rms_norm, rms_norm, rope_cos_sin,
                                   rope_inverse_frequencies, swiglu)

Params = dict[str, Any]
# The layer weights that are matmuls (`linear`): what quantization and the CPU kernels replace.
LINEAR_WEIGHTS = ("w_qkv", "wo", "w_gate_up", "w_down")
Attend = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def forward(params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array,
            kv_caches: Sequence[Any], attend: Attend) -> tuple[jax.Array, list[Any]]:
    """Runs the decoder stack; returns the final-normed hidden states `[..., hidden]` in the
    params' dtype and the updated per-layer caches. Call `compute_logits` on the rows that need them.

    The residual stream stays float32 whatever the dtype: each norm's output is cast to the dtype
    for the matmuls, whose outputs are added back in float32. In bfloat16 the stream of the default
    model reaches magnitudes of ~5000, where bfloat16 steps by 32: with a float32 stream its hidden
    states are 6x closer to float32's and the mean KL to float32 halves (0.00084 -> 0.00039)."""
    dtype = params["final_norm"].dtype
    x = embedding_columns(params["embed"], tokens).astype(jnp.float32)
    cos, sin = rope_cos_sin(positions, rope_inverse_frequencies(cfg))
    layers, eps = params["layers"], cfg.rms_norm_eps
    # Each residual add is taken with the norm after it: the MLP's with the next layer's, the last
    # layer's with the final norm.
    next_norms = [layer["attn_norm"] for layer in layers[1:]] + [params["final_norm"]]
    h = rms_norm(x, layers[0]["attn_norm"], eps).astype(dtype)
    new_caches = []
    for layer, next_norm, cache in zip(layers, next_norms, kv_caches, strict=True):
        q, k, v = _project_qkv_rope(h, layer, cfg, cos, sin)
        attn, cache = attend(q, k, v, cache)
        x, h = residual_rms_norm(x, attn.reshape(*attn.shape[:-2], -1), layer["wo"], layer["mlp_norm"], eps)
        x, h = residual_rms_norm(x, swiglu(h, layer["w_gate_up"]), layer["w_down"], next_norm, eps)
        new_caches.append(cache)
    return h, new_caches


def head_weight(params: Params):
    """The `[hidden, vocab]` head: lm_head, or the embedding table itself when they are tied."""
    return params.get("lm_head", params["embed"])


def compute_logits(params: Params, hidden: jax.Array) -> jax.Array:
    """float32 logits `[..., vocab]` from final hidden states `[..., hidden]` times `head_weight`. A
    quantized head (jaxinfer.quant) takes float32 activations, so that the logits keep float32
    precision."""
    head = head_weight(params)
    if not isinstance(head, (jax.Array, np.ndarray)):
        return linear(hidden.astype(jnp.float32), head)
    return jnp.einsum("...h,hv->...v", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)


def _project_qkv_rope(h: jax.Array, layer: Params, cfg: ModelConfig, cos: jax.Array,
                      sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q `[..., heads, hd]`, k and v `[..., kv_heads, hd]` from one matmul over the grouped w_qkv, q
    and k rotated by `apply_rope`. A weight that takes the product and the rotation at once (the CPU
    kernel's, jaxinfer.runner.step) does so in one call."""
    w = layer["w_qkv"]
    if "b_qkv" not in layer and getattr(w, "fuses_qkv_rope", lambda *_: False)(h, cfg.head_dim):
        return w.qkv_rope(h, cos, sin, cfg.num_kv_heads, cfg.q_per_kv)
    y = linear(h, w)
    if "b_qkv" in layer:
        y = y + layer["b_qkv"].astype(y.dtype)
    groups = y.reshape(*y.shape[:-1], cfg.num_kv_heads, cfg.q_per_kv + 2, cfg.head_dim)
    q = groups[..., :cfg.q_per_kv, :].reshape(*y.shape[:-1], cfg.num_heads, cfg.head_dim)
    return apply_rope(q, cos, sin), apply_rope(groups[..., cfg.q_per_kv, :], cos, sin), groups[..., cfg.q_per_kv + 1, :]


def fuse_projections(layer: Params, cfg: ModelConfig) -> Params:
    """One layer's params as checkpoints store them (`wq [hidden, heads*hd]`, `wk`/`wv
    [hidden, kv_heads*hd]`, optional biases `bq`/`bk`/`bv`, `w_gate`/`w_up [hidden, intermediate]`)
    packed into the fused layout `forward` takes (module docstring). numpy in, numpy out."""
    fused = {name: w for name, w in layer.items()
             if name not in ("wq", "wk", "wv", "bq", "bk", "bv", "w_gate", "w_up")}
    fused["w_qkv"] = group_qkv(layer["wq"], layer["wk"], layer["wv"], cfg)
    if "bq" in layer:
        fused["b_qkv"] = group_qkv(layer["bq"], layer["bk"], layer["bv"], cfg)
    fused["w_gate_up"] = interleave_gate_up(layer["w_gate"], layer["w_up"])
    return fused


def interleave_gate_up(gate, up):
    """`[..., intermediate]` gate and up columns -> `[..., 2 * intermediate]` in w_gate_up's order
    (gate_i, up_i side by side). numpy arrays stay numpy (checkpoint loading); others go through jnp."""
    xp = np if isinstance(gate, np.ndarray) and isinstance(up, np.ndarray) else jnp
    return xp.stack([gate, up], axis=-1).reshape(*gate.shape[:-1], 2 * gate.shape[-1])


def group_qkv(q, k, v, cfg: ModelConfig):
    """`[..., heads * hd]` q and `[..., kv_heads * hd]` k, v columns -> `[..., kv_heads * (q_per_kv + 2)
    * hd]` in w_qkv's order (by KV-head group). numpy arrays stay numpy (checkpoint loading); others
    go through jnp."""
    xp = np if all(isinstance(x, np.ndarray) for x in (q, k, v)) else jnp
    lead = q.shape[:-1]
    q = q.reshape(*lead, cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim)
    k = k.reshape(*lead, cfg.num_kv_heads, 1, cfg.head_dim)
    v = v.reshape(*lead, cfg.num_kv_heads, 1, cfg.head_dim)
    return xp.concatenate([q, k, v], axis=-2).reshape(*lead, -1)


def param_shapes(cfg: ModelConfig) -> Params:
    """The logical shape of every parameter, in the pytree structure `forward` takes."""
    h, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, qkv = cfg.num_heads * hd, (cfg.num_heads + 2 * cfg.num_kv_heads) * hd
    layer = {"attn_norm": (h,), "w_qkv": (h, qkv), "wo": (q, h),
             "mlp_norm": (h,), "w_gate_up": (h, 2 * inter), "w_down": (inter, h)}
    if cfg.attention_bias:
        layer |= {"b_qkv": (qkv,)}
    shapes = {"embed": (h, cfg.vocab_size), "final_norm": (h,),
              "layers": [dict(layer) for _ in range(cfg.num_layers)]}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (h, cfg.vocab_size)
    return shapes


def param_logical_axes(cfg: ModelConfig) -> Params:
    """Logical axis names of every parameter (same structure as `param_shapes`); the mapping of
    logical axes onto mesh axes lives in configs/sharding.yaml. Megatron layout: qkv and gate/up
    split by output (whole KV-head groups, intermediate units), o and down by input, embedding and
    head by vocab."""
    layer = {"attn_norm": ("embed",), "w_qkv": ("embed", "kv_heads"), "wo": ("q_heads", "embed"),
             "mlp_norm": ("embed",), "w_gate_up": ("embed", "mlp"), "w_down": ("mlp", "embed")}
    if cfg.attention_bias:
        layer |= {"b_qkv": ("kv_heads",)}
    axes = {"embed": ("embed", "vocab"), "final_norm": ("embed",),
            "layers": [dict(layer) for _ in range(cfg.num_layers)]}
    if not cfg.tie_word_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes
