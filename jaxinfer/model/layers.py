"""The numerical building blocks of a Llama layer: linear, RMSNorm (alone and after a residual add),
RoPE, SwiGLU.

Pure functions of arrays. Activations are `[..., features]` in the engine dtype (float32 or
bfloat16); every matmul accumulates in float32 (`preferred_element_type`), because XLA:CPU is
slow on bf16-output dots and because it is the accurate choice everywhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.model.config import ModelConfig


def linear(x: jax.Array, w) -> jax.Array:
    """`x [..., in] @ w [in, out] -> [..., out]` in x's dtype.

    Plain weight arrays are handled here; quantized weights (jaxinfer.quant) carry their own
    kernel as a `matmul` method.
    """
    if isinstance(w, (jax.Array, np.ndarray)):
        y = jnp.einsum("...i,io->...o", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
        return y.astype(x.dtype)
    return w.matmul(x)


def linear_in_weight_dtype(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x [..., in] @ w [in, out] -> [..., out]` with x taken in w's dtype and float32 sums, returned
    in x's dtype: how a weight stored for a CPU kernel multiplies where XLA's dot runs instead (float32
    activations against a bfloat16 head give float32 logits of the bfloat16 product)."""
    y = jnp.einsum("...i,io->...o", x.astype(w.dtype), w, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def embedding_columns(table, tokens: jax.Array) -> jax.Array:
    """Columns `tokens` of an embedding table `[hidden, vocab]` as rows `[..., hidden]`, tokens
    clipped into range. Plain tables are handled here; a table stored in another layout
    (jaxinfer.model.panel_weight) carries its own `columns`."""
    if isinstance(table, (jax.Array, np.ndarray)):
        # Rows of the transposed table: a column gather (table[:, tokens], then moveaxis) left x in a
        # layout that made XLA:CPU turn every bf16 layer dot into a float32 dot over a converted copy
        # of the weight (tests/test_model_hlo.py).
        return jnp.take(table.T, tokens, axis=0, mode="clip")
    return table.columns(tokens)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * weight.astype(jnp.float32)).astype(x.dtype)


def rope_inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """The `[head_dim // 2]` float32 inverse frequencies, with the config's RoPE scaling applied."""
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** exponents)
    scaling = cfg.rope_scaling
    if scaling is not None and scaling.kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling is not None and scaling.kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
        # interpolated smoothly.
        old_len = scaling.original_max_position_embeddings
        wavelen = 2 * np.pi / inv_freq
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        inv_freq = np.where(wavelen > low_wavelen, inv_freq / scaling.factor,
                            np.where(wavelen < high_wavelen, inv_freq, interpolated))
    return inv_freq.astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """The float32 cos and sin `[..., head_dim // 2]` of positions `[...]` (int32) times the inverse
    frequencies: what `apply_rope` rotates by, taken once for all layers."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding in HF's half-split layout. x `[..., heads, head_dim]`, cos and sin
    `[..., head_dim // 2]` (`rope_cos_sin`), computed in float32, returned in x's dtype.

    Written as x * cos + roll(x, half) * (-sin, sin), not as the concatenation of two rotated
    halves: XLA:CPU ran that one 1.2-3.5x slower on bfloat16 activations (30 layers' q at 128
    tokens)."""
    cos, sin = cos[..., None, :], sin[..., None, :]
    x32 = x.astype(jnp.float32)
    rotated = x32 * jnp.concatenate([cos, cos], axis=-1) + jnp.roll(x32, x.shape[-1] // 2, axis=-1) * (
        jnp.concatenate([-sin, sin], axis=-1))
    return rotated.astype(x.dtype)


def residual_rms_norm(residual: jax.Array, x: jax.Array, w, norm_weight: jax.Array,
                      eps: float) -> tuple[jax.Array, jax.Array]:
    """A layer's output projection added to the float32 residual stream, and the next RMSNorm:
    `residual + linear(x, w)` (the product in x's dtype, as `linear` returns it) and its `rms_norm`
    times `norm_weight` in x's dtype. A weight that takes all three at once (the CPU kernel's,
    jaxinfer.runner.step) does so in one call; XLA took them as four operations over the rows."""
    if getattr(w, "fuses_residual_norm", lambda _: False)(x):
        return w.residual_norm(x, residual, norm_weight, eps)
    residual = residual + linear(x, w).astype(jnp.float32)
    return residual, rms_norm(residual, norm_weight, eps).astype(x.dtype)


def swiglu(x: jax.Array, w_gate_up) -> jax.Array:
    """silu(gate(x)) * up(x) in x's dtype for x `[..., hidden]`, the MLP's first half (its down
    projection is `residual_rms_norm`'s); w_gate_up `[hidden, intermediate * 2]` holds gate_i and up_i
    side by side (see jaxinfer.model.llama). The product is taken in float32, silu as x / (1 + exp(-x))
    (x * sigmoid(x), which keeps the small values of very negative gates, as the CPU kernel's fused
    pass does; the form x * (1 + tanh(x / 2)) / 2 lost them to cancellation below about -17). Where XLA fuses
    it with an int8 matmul's rescaling (w8a8 prefill), that form took 1 ms a layer for 256 tokens on
    the Zen 4 VM against 0.25; bfloat16 engines' steps ran alike with either. A weight that fuses
    the product and the SwiGLU (the CPU kernel's, jaxinfer.runner.step) takes both at once."""
    if getattr(w_gate_up, "fuses_swiglu", lambda _: False)(x):
        return w_gate_up.swiglu(x)
    gate_up = linear(x, w_gate_up).astype(jnp.float32)
    gate_up = gate_up.reshape(*gate_up.shape[:-1], -1, 2)
    gate, up = gate_up[..., 0], gate_up[..., 1]
    return (gate / (1 + jnp.exp(-gate)) * up).astype(x.dtype)
