"""jaxinfer.quant: quantize_weight round trips within each mode's error bound, and the weight pytrees' matmul.

Bounds come from the rounding each mode does (half a quantization step; fp8's 3 mantissa bits),
checked on random weights with a different range per output channel.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.quant import Int4Weight, Int8Weight, W8A8Weight, default_group_size, quantize_weight
from pallas_kernels.int4_matmul import unpack_int4

IN, OUT = 192, 48


@pytest.fixture
def weight(rng):
    return (rng.standard_normal((IN, OUT)) * rng.uniform(0.01, 0.2, OUT)).astype(np.float32)


def column_absmax(w):
    return np.max(np.abs(w), axis=0, keepdims=True)


@pytest.mark.parametrize("mode", ["int8", "w8a8"])
def test_int8_round_trip_within_half_step(weight, mode):
    q = quantize_weight(weight, mode)
    assert type(q) is (Int8Weight if mode == "int8" else W8A8Weight)
    assert q.q.dtype == jnp.int8 and q.q.shape == (IN, OUT) and q.scale.shape == (OUT,)
    error = np.abs(np.asarray(q.dequantize()) - weight)
    assert np.all(error <= column_absmax(weight) / 127 / 2 * (1 + 1e-5))
    # The largest magnitude of each column maps to +-127 exactly.
    np.testing.assert_array_equal(np.max(np.abs(np.asarray(q.q, np.int32)), axis=0), 127)


@pytest.mark.parametrize("group_size", [None, 32, 96])
def test_int4_round_trip_within_half_step(weight, group_size):
    q = quantize_weight(weight, "int4", group_size=group_size)
    g = default_group_size(IN) if group_size is None else group_size
    assert isinstance(q, Int4Weight) and q.group_size == g and q.shape == (IN, OUT)
    assert q.packed.dtype == jnp.uint8 and q.packed.shape == (IN // 2, OUT)
    assert q.scale.shape == q.offset.shape == (IN // g, OUT) and q.scale.dtype == jnp.float16
    step = np.repeat(np.asarray(q.scale, np.float64), g, axis=0)
    error = np.abs(np.asarray(q.dequantize(), np.float64) - weight)
    # Half a step, plus the float16 rounding of the stored offset and step.
    assert np.all(error <= step / 2 * 1.01 + 1e-6)
    codes = np.asarray(unpack_int4(q.packed, g))
    assert codes.max() == 15 and codes.min() == 0


def test_int4_default_group_sizes():
    assert default_group_size(1536) == 128
    assert default_group_size(576) == 64  # SmolLM2's hidden size
    with pytest.raises(ValueError, match="group_size"):
        default_group_size(100)


@pytest.mark.parametrize("per_channel", [True, False])
def test_fp8_round_trip_within_mantissa_precision(weight, per_channel):
    q = quantize_weight(weight, "fp8", per_channel=per_channel)
    assert isinstance(q, W8A8Weight) and q.q.dtype == jnp.float8_e4m3fn
    assert q.scale.shape == ((OUT,) if per_channel else ())
    absmax = column_absmax(weight) if per_channel else np.max(np.abs(weight))
    error = np.abs(np.asarray(q.dequantize(), np.float64) - weight)
    # e4m3: half-ulp is 2^-4 relative; below the normal range the step is 2^-9 of absmax / 448.
    assert np.all(error <= np.maximum(np.abs(weight) * 2.0**-4, absmax / 448 * 2.0**-10) * (1 + 1e-6))
    assert not np.any(np.isnan(np.asarray(q.q, np.float32)))


def importance_weighted_error(q, weight, importance):
    return np.sum(importance[:, None] * (np.asarray(q.dequantize(), np.float64) - weight) ** 2, axis=0)


@pytest.mark.parametrize("per_channel", [True, False])
def test_fp8_importance_search_lowers_the_weighted_error(rng, per_channel):
    # Light-tailed weights (uniform, like SmolLM2's): mapping the largest magnitude to 448 puts it
    # in e4m3's coarsest octave, which a searched scale can avoid.
    weight = (rng.uniform(-1, 1, (IN, OUT)) * rng.uniform(0.01, 0.2, OUT)).astype(np.float32)
    importance = rng.uniform(0.1, 10, IN).astype(np.float32)
    plain = quantize_weight(weight, "fp8", per_channel=per_channel)
    searched = quantize_weight(weight, "fp8", per_channel=per_channel, importance=importance)
    assert searched.scale.shape == plain.scale.shape and searched.q.dtype == jnp.float8_e4m3fn
    assert not np.any(np.isnan(np.asarray(searched.q, np.float32)))
    # The plain scale is one of the candidates, so no channel gets worse, and the total improves
    # (less for one shared scale, which has a single choice to make).
    plain_error = importance_weighted_error(plain, weight, importance)
    searched_error = importance_weighted_error(searched, weight, importance)
    if per_channel:
        assert np.all(searched_error <= plain_error * (1 + 1e-6))
    assert searched_error.sum() < (0.8 if per_channel else 0.95) * plain_error.sum()


def test_fp8_importance_is_taken_for_the_scaled_activations(rng, weight):
    # With an input_scale the quantized matrix multiplies x / input_scale: the search must weigh
    # row i by importance_i / input_scale_i^2, i.e. the same as unit importance scaled this way.
    input_scale = rng.uniform(0.3, 3, IN).astype(np.float32)
    importance = rng.uniform(0.1, 10, IN).astype(np.float32)
    q = quantize_weight(weight, "fp8", input_scale=input_scale, importance=importance)
    folded = quantize_weight(weight * input_scale[:, None], "fp8", importance=importance / input_scale**2)
    np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(folded.scale))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_int4_clip_bounds_a_group_of_one_sign_too(rng, sign):
    # A group whose values all have one sign: clip * max|group| may lie below its smallest magnitude,
    # so every value clamps to the bound (a flat group, whose scale is guarded).
    g, groups = 32, 3
    w = (sign * rng.uniform(0.5, 1.0, (groups * g, 4))).astype(np.float32)
    ratio = rng.uniform(0.3, 0.45, (groups, 4)).astype(np.float32)
    restored = np.asarray(quantize_weight(w, "int4", group_size=g, clip=ratio).dequantize(), np.float64)
    bound = np.repeat(ratio * np.abs(w).reshape(groups, g, 4).max(axis=1), g, axis=0)
    np.testing.assert_allclose(restored, sign * bound, rtol=2e-3)


def test_int4_clip_bounds_each_group_and_one_is_no_clip(rng, weight):
    g = 32
    ratio = rng.uniform(0.5, 0.9, (IN // g, OUT)).astype(np.float32)
    plain = quantize_weight(weight, "int4", group_size=g)
    unclipped = quantize_weight(weight, "int4", group_size=g, clip=np.ones_like(ratio))
    np.testing.assert_array_equal(np.asarray(unclipped.packed), np.asarray(plain.packed))
    np.testing.assert_array_equal(np.asarray(unclipped.scale), np.asarray(plain.scale))
    clipped = quantize_weight(weight, "int4", group_size=g, clip=ratio)
    bound = np.repeat(ratio * np.max(np.abs(weight.reshape(IN // g, g, OUT)), axis=1), g, axis=0)
    restored = np.asarray(clipped.dequantize(), np.float64)
    step = np.repeat(np.asarray(clipped.scale, np.float64), g, axis=0)
    assert np.all(np.abs(restored) <= bound + step / 2 * 1.01 + 1e-6)
    # Inside the clipped range the usual half-step bound holds.
    inside = np.abs(weight) <= bound
    assert np.all(np.abs(restored - weight)[inside] <= step[inside] / 2 * 1.01 + 1e-6)
    assert np.all(step <= np.repeat(np.asarray(plain.scale, np.float64), g, axis=0) * 1.001)
    with pytest.raises(ValueError, match="clip"):
        quantize_weight(weight, "int4", group_size=g, clip=ratio[:, :-1])


@pytest.mark.parametrize("mode", ["int8", "int4", "w8a8", "fp8", "w4a8"])
def test_input_scale_is_folded_into_weight_and_divided_out_of_activations(rng, weight, mode):
    input_scale = rng.uniform(0.25, 4.0, IN).astype(np.float32)
    q = quantize_weight(weight, mode, input_scale=input_scale)
    plain = quantize_weight(weight * input_scale[:, None], mode)
    # The stored codes are those of diag(input_scale) @ w ...
    for folded, unfolded in zip(jax.tree_util.tree_leaves(q)[:-1], jax.tree_util.tree_leaves(plain)):
        np.testing.assert_array_equal(np.asarray(folded, np.float32), np.asarray(unfolded, np.float32))
    # ... and the weight still stands for w: dequantize and matmul undo the scaling.
    np.testing.assert_allclose(np.asarray(q.dequantize()), np.asarray(plain.dequantize()) / input_scale[:, None], rtol=1e-6)
    x = jnp.asarray(rng.standard_normal((3, IN)), jnp.float32)
    expected = plain.matmul(x / input_scale)
    np.testing.assert_allclose(np.asarray(q.matmul(x)), np.asarray(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["int8", "int4", "w8a8", "fp8", "w4a8"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_takes_leading_dims_under_jit(rng, weight, mode, dtype):
    q = jax.device_put(quantize_weight(weight, mode))
    x = jnp.asarray(rng.standard_normal((2, 3, IN)) + 0.1, dtype)
    matmul = jax.jit(lambda w, x: w.matmul(x))
    out = matmul(q, x)
    assert out.shape == (2, 3, OUT) and out.dtype == dtype
    # Both jitted: eager and jitted XLA may round differently (bfloat16 intermediates, which can move
    # an 8-bit activation code by a step: fp8 on the Zen 3 VM); a reshape bug moves whole rows.
    rows = np.asarray(matmul(q, x.reshape(6, IN)), np.float32)
    np.testing.assert_allclose(np.asarray(out.reshape(6, OUT), np.float32), rows, atol=2.0**-7 * np.abs(rows).max())


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_weight_only_matmul_matches_dequantized_weight(rng, weight, mode):
    q = quantize_weight(weight, mode)
    w = np.asarray(q.dequantize(), np.float64)
    for m in (1, 7):
        x = rng.standard_normal((m, IN)) + 0.1
        out = np.asarray(q.matmul(jnp.asarray(x, jnp.float32)), np.float64)
        # Float activations: only the CPU path's bf16 / split-int8 rounding, far below 1% of |x| @ |w|.
        bound = 2.0**-7 * (np.abs(x) @ np.abs(w))
        assert np.all(np.abs(out - x @ w) <= bound)


@pytest.mark.parametrize("mode, x_step", [("w8a8", 1 / 254), ("fp8", 2.0**-4), ("w4a8", 1 / 254)])
def test_w8a8_matmul_error_from_activation_quantization(rng, weight, mode, x_step):
    q = quantize_weight(weight, mode)
    w = np.asarray(q.dequantize(), np.float64)
    x = rng.standard_normal((5, IN)) + 0.1
    out = np.asarray(q.matmul(jnp.asarray(x, jnp.float32)), np.float64)
    # int8: each activation moves by at most half a step of its row's (w4a8: its group's) absmax / 127;
    # fp8: by 2^-4 of itself (normal range) or a subnormal half-step of absmax / 448.
    row_absmax = np.max(np.abs(x), axis=1, keepdims=True)
    if mode == "w8a8":
        x_error = np.broadcast_to(row_absmax * x_step, x.shape)
    elif mode == "w4a8":
        groups = np.abs(x).reshape(len(x), -1, q.group_size)
        x_error = np.broadcast_to(groups.max(axis=2, keepdims=True) * x_step, groups.shape).reshape(x.shape)
    else:
        x_error = np.maximum(np.abs(x) * x_step, row_absmax / 448 * 2.0**-10)
    bound = x_error @ np.abs(w) + 1e-5 * (np.abs(x) @ np.abs(w))
    assert np.all(np.abs(out - x @ w) <= bound)


def test_quantized_weights_are_pytrees_of_arrays(weight):
    q = quantize_weight(weight, "int4")
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert [leaf.shape for leaf in leaves] == [(IN // 2, OUT), (IN // 64, OUT), (IN // 64, OUT)]
    assert jax.tree_util.tree_unflatten(treedef, leaves) == q


def test_bad_input_is_refused_with_a_message(weight):
    with pytest.raises(ValueError, match="unknown quantization mode"):
        quantize_weight(weight, "int3")
    with pytest.raises(ValueError, match=r"2-D \[in, out\]"):
        quantize_weight(weight[0], "int8")
    with pytest.raises(ValueError, match="group_size must be even and divide"):
        quantize_weight(weight, "int4", group_size=80)
    with pytest.raises(ValueError, match="input_scale must have shape"):
        quantize_weight(weight, "w8a8", input_scale=np.ones(OUT))
    with pytest.raises(ValueError, match="positive and finite"):
        quantize_weight(weight, "int4", input_scale=-np.ones(IN))
    with pytest.raises(TypeError, match="group_size"):
        quantize_weight(weight, "int8", group_size=64)
    with pytest.raises(ValueError, match=r"expects 192.*\[in, out\]"):
        quantize_weight(weight, "int8").matmul(jnp.ones((2, OUT)))


@pytest.mark.parametrize("mode", ["int4", "fp8"])
def test_cpu_path_keeps_one_converted_weight_live_at_a_time(rng, mode):
    # Unpacked / converted weights must not all be hoisted to the start of a multi-layer program
    # (xla_cpu.after_activations): the temporaries of a chain stay near one layer's worth.
    size, layers = 256, 8
    weights = [quantize_weight(rng.standard_normal((size, size)).astype(np.float32), mode) for _ in range(layers)]

    def chain(weights, x):
        for w in weights:
            x = w.matmul(x)
        return x

    compiled = jax.jit(chain).lower(weights, jnp.ones((1, size), jnp.float32)).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    # One row: int4 dequantizes to an f32 copy, fp8 converts to bf16 (xla_cpu, w8a8_matmul).
    one_converted_weight = size * size * {"int4": 4, "fp8": 2}[mode]
    assert analysis.temp_size_in_bytes < 2 * one_converted_weight


def test_awq_is_never_worse_than_round_to_nearest_on_its_sample(rng):
    # Activations correlated across groups: each group's best clip, chosen on its own share of the
    # output, can add up worse than no clipping at all; the search must then keep no clipping.
    from jaxinfer.quant.calibration import ActivationStats
    from jaxinfer.quant.scaling import awq_search

    for _ in range(12):
        w = (rng.standard_normal((64, 2)) * 0.05).astype(np.float32)
        common = rng.standard_normal((8, 1))
        x = (np.sign(common) + 0.3 * rng.standard_normal((8, 64))).astype(np.float32)
        stats = ActivationStats(np.abs(x).mean(0), np.abs(x).max(0), (x ** 2).mean(0), x)
        choice = awq_search(w, stats, group_size=32)
        unclipped = awq_search(w, stats, group_size=32, clips=(1.0,))
        assert choice.error <= unclipped.error <= choice.rtn_error * (1 + 1e-6)
