"""W4A8 (pallas_kernels/w4a8_matmul.py and the C++ kernel cpu_int4_dot.{cc,py}): the packed layout
against its documented formula, the XLA formulation against exact integer math on the quantized
activations, the kernel against the XLA formulation for every row block it has, its live-row count
(an engine step's real tokens), and a Q4_1-shaped weight (groups of 32 on a 4-bit grid) coming back
exactly from quantization. Its fused calls: tests/test_cpu_row_passes.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.model.layers import linear
from jaxinfer.quant import W4A8Weight, quantize_weight
from jaxinfer.runner.step import route_dense_weights
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

