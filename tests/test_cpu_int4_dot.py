"""W4A8 (pallas_kernels/w4a8_matmul.py and the C++ kernel cpu_int4_dot.{cc,py}): the packed layout
against its documented formula, the XLA formulation against exact integer math on the quantized
activations, the kernel against the XLA formulation for every row block it has, its live-row count
(an engine step's real tokens), its fused calls (residual add and RMSNorm, qkv split and RoPE,
SwiGLU) against the model's ops on its product, and a Q4_1-shaped weight (groups of 32 on a 4-bit
grid) coming back exactly from quantization."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.model import llama
from jaxinfer.model.layers import apply_rope, linear, residual_rms_norm, rms_norm, swiglu
from jaxinfer.quant import W4A8Weight, quantize_weight
from jaxinfer.runner.step import LiveRowsQuantizedWeight, route_dense_weights
from pallas_kernels import cpu_int4_dot
from pallas_kernels.int4_matmul import unpack_int4
from pallas_kernels.w4a8_matmul import quantize_groups, w4a8_matmul, w4a8_matmul_xla

needs_kernel = pytest.mark.skipif(not cpu_int4_dot.available(),
                                  reason="needs an x86-64 CPU with AVX2 and a C++ compiler")


def random_w4a8(rng, k: int, n: int, group_size: int = 32) -> W4A8Weight:
    return quantize_weight(rng.standard_normal((k, n)).astype(np.float32), "w4a8", group_size=group_size)


def test_pack_is_the_documented_layout_and_unpack_inverts_it(rng):
    w = random_w4a8(rng, 64, 32)
    codes, scale, offset = cpu_int4_dot.pack(w.packed, w.scale, w.offset)
    assert codes.shape == (2, 8, 16, 4) and scale.shape == offset.shape == (2, 2, 16)
    q = np.asarray(unpack_int4(w.packed, 32))
    b, o, r, j = 1, 5, 3, 2
    assert int(codes[b, o, r, j]) == q[8 * o + j, 16 * b + r] | q[8 * o + 4 + j, 16 * b + r] << 4
    assert scale[b, 1, r] == w.scale[1, 16 * b + r] and offset[b, 1, r] == w.offset[1, 16 * b + r]
    assert cpu_int4_dot.logical_shape(codes) == cpu_int4_dot.logical_shape(w.packed) == (64, 32)
    for got, want in zip(cpu_int4_dot.unpack(codes, scale, offset), (w.packed, w.scale, w.offset)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    packed_weight = W4A8Weight(codes, scale, offset)
    assert packed_weight.shape == (64, 32) and packed_weight.group_size == 32
    np.testing.assert_array_equal(np.asarray(packed_weight.dequantize()), np.asarray(w.dequantize()))
    narrow = random_w4a8(rng, 64, 24)
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu_int4_dot.pack(narrow.packed, narrow.scale, narrow.offset)


def test_xla_formulation_is_exact_integer_math_on_the_quantized_groups(rng):
    m, k, n, g = 3, 96, 48, 32
    w = random_w4a8(rng, k, n)
    x = rng.standard_normal((m, k)).astype(np.float32) * rng.uniform(0.1, 10, (1, k)).astype(np.float32)
    x_q, x_scale = map(np.asarray, quantize_groups(jnp.asarray(x), g))
    q = np.asarray(unpack_int4(w.packed, g)).astype(np.int64).reshape(k // g, g, n)
    dots = np.einsum("mgk,gkn->mgn", x_q.astype(np.int64), q)  # exact
    scale, offset = np.asarray(w.scale, np.float64), np.asarray(w.offset, np.float64)
    want = (np.einsum("mgn,mg,gn->mn", dots, x_scale, scale)
            + x.reshape(m, k // g, g).sum(-1).astype(np.float64) @ offset)
    got = np.asarray(w4a8_matmul_xla(jnp.asarray(x), w.packed, w.scale, w.offset))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())
    # and what it approximates: the float matmul on the dequantized weight, within int8 rounding
    np.testing.assert_allclose(got, x @ np.asarray(w.dequantize()), atol=0.02 * np.abs(want).max())


@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 8, 9, 17, 40])
@pytest.mark.parametrize("k, n, group_size", [(576, 960, 32), (1536, 576, 32), (64, 16, 32), (256, 48, 64),
                                              (384, 32, 128)])
def test_kernel_matches_the_xla_formulation(rng, m, k, n, group_size):
    w = random_w4a8(rng, k, n, group_size)
    x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
    want = np.asarray(w4a8_matmul_xla(x, w.packed, w.scale, w.offset))
    codes, scale, offset = cpu_int4_dot.pack(w.packed, w.scale, w.offset)
    got = jax.jit(w4a8_matmul)(x, codes, scale, offset)
    assert got.dtype == jnp.float32 and got.shape == (m, n)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@needs_kernel
def test_kernel_quantizes_zero_and_outlier_groups_like_the_xla_formulation(rng):
    w = random_w4a8(rng, 128, 32)
    x = rng.standard_normal((2, 128)).astype(np.float32)
    x[0, :32] = 0.0  # a zero group: scale 1/127, codes zero
    x[1, 40] = 300.0  # an outlier quantizes its own group only
    codes, scale, offset = cpu_int4_dot.pack(w.packed, w.scale, w.offset)
    got = np.asarray(cpu_int4_dot.w4a8_dot(jnp.asarray(x), codes, scale, offset))
    want = np.asarray(w4a8_matmul_xla(jnp.asarray(x), w.packed, w.scale, w.offset))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_q4_1_shaped_weights_come_back_exactly(rng):
    """A weight on Q4_1's grid (per 32: a float16 step d and minimum m, codes 0..15 with both ends
    used, as llama.cpp quantizes) quantizes to exactly its codes, steps and minima: the default
    model's GGUF file holds such weights."""
    k, n = 128, 48
    d = rng.uniform(0.001, 0.05, (k // 32, n)).astype(np.float16)
    low = rng.uniform(-0.4, -0.01, (k // 32, n)).astype(np.float16)
    codes = rng.integers(0, 16, (k // 32, 32, n)).astype(np.float32)
    codes[:, 0], codes[:, 1] = 0, 15
    w = (codes * d[:, None].astype(np.float32) + low[:, None].astype(np.float32)).reshape(k, n)
    q = quantize_weight(w, "w4a8", group_size=32)
    np.testing.assert_array_equal(np.asarray(unpack_int4(q.packed, 32)), codes.reshape(k, n))
    np.testing.assert_array_equal(np.asarray(q.scale), d)
    np.testing.assert_array_equal(np.asarray(q.offset), low)


@needs_kernel
def test_kernel_refuses_operands_it_cannot_read(rng):
    w = random_w4a8(rng, 64, 16)
    codes, scale, offset = cpu_int4_dot.pack(w.packed, w.scale, w.offset)
    with pytest.raises(ValueError, match=r"x \[M, K\]"):
        cpu_int4_dot.w4a8_dot(jnp.ones((2, 32)), codes, scale, offset)
    with pytest.raises(ValueError, match="uint8"):
        cpu_int4_dot.w4a8_dot(jnp.ones((2, 64)), w.packed, w.scale, w.offset)


@needs_kernel
@pytest.mark.parametrize("m, live", [(8, 5), (40, 23), (40, 0), (40, 99)])
def test_kernel_computes_only_the_live_rows(rng, m, live):
    """An engine step passes its real tokens' count: the first `live` rows (clamped to [0, M]) come
    out as a call on those rows alone, bit for bit, and the bucket's padding rows as zeros."""
    w = random_w4a8(rng, 576, 96)
    codes, scale, offset = cpu_int4_dot.pack(w.packed, w.scale, w.offset)
    x = jnp.asarray(rng.standard_normal((m, 576)), jnp.float32)
    rows = min(live, m)
    got = np.asarray(jax.jit(cpu_int4_dot.w4a8_dot)(x, codes, scale, offset, jnp.int32(live)))
    assert not got[rows:].any()
    if rows:
        np.testing.assert_array_equal(got[:rows], np.asarray(cpu_int4_dot.w4a8_dot(x[:rows], codes, scale, offset)))
    with pytest.raises(Exception, match="live-row count"):
        jax.ffi.ffi_call(cpu_int4_dot.TARGET, jax.ShapeDtypeStruct((m, 96), jnp.float32))(
            x, codes, scale.astype(jnp.float16), offset.astype(jnp.float16), jnp.zeros((0,), jnp.int32)
        ).block_until_ready()


@needs_kernel
def test_engine_steps_hand_packed_w4a8_weights_their_real_token_count(rng):
    """`route_dense_weights` in a step wraps each quantized layer weight with the step's real tokens,
    so a packed W4A8 weight's kernel skips the padding rows; without a count the weight is unchanged."""
    w = random_w4a8(rng, 64, 32)
    packed = W4A8Weight(*cpu_int4_dot.pack(w.packed, w.scale, w.offset))
    params = {"embed": jnp.ones((16, 64)), "layers": [{"wo": packed, "attn_norm": jnp.ones(64)}], "lm_head": packed}
    routed = route_dense_weights(params, num_devices=1, live_rows=jnp.int32(3))
    assert routed["lm_head"] is packed and routed["layers"][0]["attn_norm"] is params["layers"][0]["attn_norm"]
    x = jnp.asarray(rng.standard_normal((8, 64)), jnp.float32)
    got = np.asarray(jax.jit(linear)(x, routed["layers"][0]["wo"]))
    assert not got[3:].any()
    np.testing.assert_array_equal(got[:3], np.asarray(linear(x[:3], packed)))
    assert route_dense_weights(params, num_devices=2, live_rows=jnp.int32(3)) is params


def packed_w4a8(rng, k: int, n: int) -> W4A8Weight:
    w = random_w4a8(rng, k, n)
    return W4A8Weight(*cpu_int4_dot.pack(w.packed, w.scale, w.offset))


@needs_kernel
@pytest.mark.parametrize("m, live", [(1, 1), (5, 4), (40, 37)])
def test_fused_calls_match_the_layer_ops_after_the_kernels_product(rng, m, live):
    """The residual add and RMSNorm, the qkv split and RoPE, and the SwiGLU taken in the kernel's call
    give what the model's float32 ops give on the kernel's own product, and zeros past the live rows."""
    x = jnp.asarray(rng.standard_normal((m, 576)) * rng.uniform(0.1, 4, 576), jnp.float32)
    live_rows = jnp.int32(live)

    def product(w: W4A8Weight) -> jax.Array:
        return cpu_int4_dot.w4a8_dot(x, w.packed, w.scale, w.offset)[:live]

    wo = packed_w4a8(rng, 576, 576)
    residual = jnp.asarray(rng.standard_normal((m, 576)) * 30, jnp.float32)
    norm_weight = jnp.asarray(rng.uniform(0.2, 2, 576), jnp.float32)
    add_norm = jax.jit(cpu_int4_dot.w4a8_add_norm, static_argnums=6)
    total, normed = add_norm(x, wo.packed, wo.scale, wo.offset, residual, norm_weight, 1e-5, live_rows)
    want_total = residual[:live] + product(wo)
    np.testing.assert_array_equal(np.asarray(total[:live]), np.asarray(want_total))
    np.testing.assert_allclose(np.asarray(normed[:live]), np.asarray(rms_norm(want_total, norm_weight, 1e-5)),
                               rtol=1e-5, atol=1e-6)

    kv_heads, q_per_kv, head_dim = 3, 3, 64
    w_qkv = packed_w4a8(rng, 576, kv_heads * (q_per_kv + 2) * head_dim)
    angles = rng.uniform(0, 100, (m, head_dim // 2)).astype(np.float32)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    qkv_rope = jax.jit(cpu_int4_dot.w4a8_qkv_rope, static_argnums=(6, 7))
    q, k, v = qkv_rope(x, w_qkv.packed, w_qkv.scale, w_qkv.offset, cos, sin, kv_heads, q_per_kv, live_rows)
    groups = product(w_qkv).reshape(live, kv_heads, q_per_kv + 2, head_dim)
    want_q = apply_rope(groups[:, :, :q_per_kv].reshape(live, -1, head_dim), cos[:live], sin[:live])
    want_k = apply_rope(groups[:, :, q_per_kv], cos[:live], sin[:live])
    for got, want in ((q, want_q), (k, want_k), (v, groups[:, :, q_per_kv + 1])):
        np.testing.assert_allclose(np.asarray(got[:live]), np.asarray(want).reshape(live, -1), rtol=1e-5,
                                   atol=1e-5 * float(jnp.abs(want).max()))

    w_gate_up = packed_w4a8(rng, 576, 2 * 1536)
    act = jax.jit(cpu_int4_dot.w4a8_swiglu)(x, w_gate_up.packed, w_gate_up.scale, w_gate_up.offset, live_rows)
    gate_up = product(w_gate_up).reshape(live, 1536, 2)
    want_act = gate_up[..., 0] / (1 + jnp.exp(-gate_up[..., 0])) * gate_up[..., 1]
    np.testing.assert_allclose(np.asarray(act[:live]), np.asarray(want_act), rtol=1e-5,
                               atol=1e-6 * float(jnp.abs(want_act).max()))
    for padding in (total, normed, q, k, v, act):
        assert not np.asarray(padding[live:]).any()


@needs_kernel
def test_engine_steps_take_the_fused_w4a8_calls_for_float32_activations(rng):
    """In a step (LiveRowsQuantizedWeight) a packed W4A8 weight takes the model's residual add and
    norm, qkv split and RoPE, and SwiGLU into its kernel's call for float32 activations; bfloat16
    activations keep the unfused ops."""
    kv_heads, q_per_kv, head_dim = 2, 2, 32
    cfg = SimpleNamespace(num_kv_heads=kv_heads, q_per_kv=q_per_kv, head_dim=head_dim, num_heads=kv_heads * q_per_kv)
    layer = {"w_qkv": packed_w4a8(rng, 64, kv_heads * (q_per_kv + 2) * head_dim), "wo": packed_w4a8(rng, 64, 64),
             "w_gate_up": packed_w4a8(rng, 64, 2 * 96)}
    live = jnp.int32(3)
    routed = {name: LiveRowsQuantizedWeight(w, live) for name, w in layer.items()}
    cos = sin = jnp.ones((4, head_dim // 2), jnp.float32)
    norm_weight = jnp.ones((64,), jnp.float32)

    def calls(dtype, weights) -> str:
        def layer_ops(x, residual):
            return (llama._project_qkv_rope(x, weights, cfg, cos, sin),
                    residual_rms_norm(residual, x, weights["wo"], norm_weight, 1e-5), swiglu(x, weights["w_gate_up"]))
        return jax.jit(layer_ops).lower(jnp.ones((4, 64), dtype), jnp.ones((4, 64), jnp.float32)).as_text()

    fused = calls(jnp.float32, routed)
    targets = (cpu_int4_dot.ADD_NORM_TARGET, cpu_int4_dot.QKV_ROPE_TARGET, cpu_int4_dot.SWIGLU_TARGET)
    assert all(target in fused for target in targets)
    for unfused in (calls(jnp.bfloat16, routed), calls(jnp.float32, layer)):
        assert not any(target in unfused for target in targets) and cpu_int4_dot.TARGET in unfused


@needs_kernel
def test_fused_calls_refuse_operands_they_do_not_take(rng):
    w = packed_w4a8(rng, 64, 96)
    x = jnp.ones((2, 64), jnp.float32)
    with pytest.raises(ValueError, match="residual"):
        cpu_int4_dot.w4a8_add_norm(x, w.packed, w.scale, w.offset, jnp.ones((2, 48), jnp.float32),
                                   jnp.ones((96,)), 1e-5)
    with pytest.raises(ValueError, match="96 outputs for 2 kv heads of 2 query heads"):
        cpu_int4_dot.w4a8_qkv_rope(x, w.packed, w.scale, w.offset, jnp.ones((2, 16)), jnp.ones((2, 16)), 2, 2)
    odd_halves = packed_w4a8(rng, 64, 80)
    with pytest.raises(ValueError, match="F a multiple of 16; got 80"):
        cpu_int4_dot.w4a8_swiglu(x, odd_halves.packed, odd_halves.scale, odd_halves.offset)
