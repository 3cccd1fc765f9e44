"""Quantized matmul kernels (pallas_kernels/*): the Pallas kernels (compiled on a GPU, in interpret mode
elsewhere) and the XLA/CPU paths against the pure-JAX references.

The integer cores are compared for exact equality with numpy int64 math; float results against the
reference within a bound derived from the arithmetic each path does. Shapes are small (interpret
mode is slow) but cover M = 1 (decode), M not a multiple of the row tile, several row tiles, and
K loops of several steps.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import F32_DOT_ERROR, ON_GPU, PALLAS_MODE
from pallas_kernels import activation_quant, cpu_int8_dot, xla_cpu
from pallas_kernels.int4_matmul import (
    SPLIT_DOT_MAX_ROWS,
    dequantize_int4,
    int4_matmul,
    int4_matmul_pallas,
    pack_int4,
    unpack_int4,
)
from pallas_kernels.int8_matmul import int8_matmul, int8_matmul_pallas
from pallas_kernels.quant_tiling import resolve_implementation
from pallas_kernels.w8a8_matmul import quantized_dot, w8a8_matmul

ROWS = (1, 19, 70)  # decode; not a multiple of the 16/32/64 row tile; two row tiles
SPLIT_ERROR = 1 / 64516  # activation_quant.split_per_token_int8, relative to each row's max |x|
BF16_ERROR = 2.0**-8  # one rounding of x and one of the weight (or of the output) to bf16


def activations(rng, m, k, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal((m, k)) + 0.1, dtype)


def assert_within(actual, expected, bound, what):
    error = np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))
    worst = np.unravel_index(np.argmax(error - bound), error.shape)
    assert np.all(error <= bound), f"{what}: error {error[worst]:.3g} > bound {np.broadcast_to(bound, error.shape)[worst]:.3g} at {worst}"


def dot_magnitude(x, w):
    """|x| @ |w|: the scale of rounding errors in x @ w."""
    return np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(w, np.float64))


def split_bound(x, w_magnitude):
    """What splitting each row of x into two int8 levels can change in x @ w (per output)."""
    row_absmax = np.max(np.abs(np.asarray(x, np.float64)), axis=1, keepdims=True)
    return row_absmax * SPLIT_ERROR * np.sum(np.asarray(w_magnitude, np.float64), axis=0)[None, :]


@pytest.mark.skipif(ON_GPU, reason="the CPU's choice of implementation")
def test_default_implementation_on_cpu_is_xla_never_interpret():
    assert resolve_implementation(None) == "xla"
    assert resolve_implementation(None, tileable=False) == "xla"
    with pytest.raises(ValueError, match="unknown matmul implementation"):
        resolve_implementation("triton")


# ---- activation quantization -------------------------------------------------------------------


@pytest.mark.parametrize("dtype, step", [(jnp.int8, 1 / 127), (jnp.float8_e4m3fn, None)])
def test_quantize_per_token_reconstructs_rows(rng, dtype, step):
    x = activations(rng, 7, 96) * jnp.asarray(rng.uniform(0.01, 30, (7, 1)), jnp.float32)
    x_q, scale = activation_quant.quantize_per_token(x, dtype)
    assert x_q.dtype == dtype and scale.shape == (7,)
    restored = np.asarray(x_q, np.float64) * np.asarray(scale)[:, None]
    row_absmax = np.max(np.abs(np.asarray(x)), axis=1, keepdims=True)
    if step is not None:  # int8: half a step of absmax / 127
        bound = row_absmax * step / 2 * (1 + 1e-6)
    else:  # e4m3: 3 mantissa bits (half-ulp 2^-4 relative), subnormal step 2^-9 of absmax / 448
        bound = np.maximum(np.abs(np.asarray(x)) * 2.0**-4, row_absmax / 448 * 2.0**-10) * (1 + 1e-6)
    assert_within(restored, x, bound, f"per-token {jnp.dtype(dtype).name}")
    assert np.allclose(np.max(np.abs(restored), axis=1), row_absmax[:, 0], rtol=1e-6)


def test_split_per_token_int8_error_bound(rng):
    x = activations(rng, 5, 200) * jnp.asarray(rng.uniform(0.001, 100, (5, 1)), jnp.float32)
    x_q, scale = activation_quant.split_per_token_int8(x)
    assert x_q.shape == (10, 200) and x_q.dtype == jnp.int8 and scale.shape == (10,)
    restored = activation_quant.merge_split_rows(jnp.asarray(x_q, jnp.int32), scale)
    row_absmax = np.max(np.abs(np.asarray(x)), axis=1, keepdims=True)
    assert_within(restored, x, row_absmax * SPLIT_ERROR * (1 + 1e-3), "two-level int8 split")


# ---- int4 packing ------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_pack_unpack_exact(rng, group_size):
    codes = rng.integers(0, 16, (256, 24)).astype(np.uint8)
    packed = pack_int4(jnp.asarray(codes), group_size)
    assert packed.shape == (128, 24) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(unpack_int4(packed, group_size)), codes)
    # The documented layout: low nibble = row j, high nibble = row j + G/2 of the same group.
    np.testing.assert_array_equal(np.asarray(packed)[0], codes[0] | (codes[group_size // 2] << 4))


# ---- int8 x int8 -> int32 core -----------------------------------------------------------------


@pytest.mark.parametrize("implementation", [PALLAS_MODE, "xla", "reference"])
@pytest.mark.parametrize("m", ROWS)
def test_int8_dot_is_exact_integer_math(rng, implementation, m):
    k, n = 160, 48
    x_q = rng.integers(-127, 128, (m, k)).astype(np.int8)
    w_q = rng.integers(-127, 128, (k, n)).astype(np.int8)
    acc = quantized_dot(jnp.asarray(x_q), jnp.asarray(w_q), implementation=implementation)
    assert acc.dtype == jnp.int32 and acc.shape == (m, n)
    np.testing.assert_array_equal(np.asarray(acc), x_q.astype(np.int64) @ w_q.astype(np.int64))


@pytest.mark.parametrize("implementation", [PALLAS_MODE, "xla", "reference"])
def test_int8_dot_accumulates_past_float32_precision(rng, implementation):
    # Same-signed products summing past 2^24: a float32 accumulator would round these sums.
    k, n = 2048, 32
    x_q = rng.integers(100, 128, (3, k)).astype(np.int8)
    w_q = rng.integers(100, 128, (k, n)).astype(np.int8)
    expected = x_q.astype(np.int64) @ w_q.astype(np.int64)
    assert expected.min() > 2**24
    acc = quantized_dot(jnp.asarray(x_q), jnp.asarray(w_q), implementation=implementation)
    np.testing.assert_array_equal(np.asarray(acc), expected)


@pytest.mark.parametrize("implementation", [PALLAS_MODE, "xla"])
def test_fp8_dot_matches_reference(rng, implementation):
    k, n = 96, 32
    x_q = jnp.asarray(rng.standard_normal((19, k)) * 40, jnp.float8_e4m3fn)
    w_q = jnp.asarray(rng.standard_normal((k, n)) * 40, jnp.float8_e4m3fn)
    acc = quantized_dot(x_q, w_q, implementation=implementation)
    assert acc.dtype == jnp.float32
    exact = np.asarray(x_q, np.float64) @ np.asarray(w_q, np.float64)
    assert_within(acc, exact, F32_DOT_ERROR * dot_magnitude(np.asarray(x_q, np.float32), np.asarray(w_q, np.float32)), "fp8 dot")


# ---- int8 weight-only (W8A16) ------------------------------------------------------------------


def int8_weight(rng, k, n):
    w_q = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
    w_scale = jnp.asarray(rng.uniform(0.5, 2.0, n) / 127, jnp.float32)
    return w_q, w_scale


@pytest.mark.parametrize("m", ROWS)
def test_int8_matmul_pallas_matches_reference(rng, m):
    k, n = 96, 80
    x = activations(rng, m, k)
    w_q, w_scale = int8_weight(rng, k, n)
    expected = int8_matmul(x, w_q, w_scale, implementation="reference")
    interpreted = int8_matmul(x, w_q, w_scale, implementation=PALLAS_MODE)
    assert interpreted.shape == (m, n) and interpreted.dtype == jnp.float32
    w = np.asarray(w_q, np.float64) * np.asarray(w_scale)
    assert_within(interpreted, expected, F32_DOT_ERROR * dot_magnitude(x, w), f"int8 {PALLAS_MODE}")


@pytest.mark.parametrize("layout", ["in cache", "too large for cache", "packed for the CPU kernel"])
@pytest.mark.parametrize("m", ROWS)
def test_int8_matmul_on_cpu_matches_reference(rng, monkeypatch, m, layout):
    if layout == "too large for cache":  # what a weight like the 576x49152 LM head gets
        monkeypatch.setattr(xla_cpu, "CACHE_RESIDENT_BYTES", 0)
    k, n = 96, 64
    x = activations(rng, m, k)
    w_q, w_scale = int8_weight(rng, k, n)
    expected = int8_matmul(x, w_q, w_scale, implementation="reference")
    stored = cpu_int8_dot.pack(w_q) if layout == "packed for the CPU kernel" else w_q
    on_cpu = int8_matmul(x, stored, w_scale, implementation=None)
    assert on_cpu.shape == (m, n) and on_cpu.dtype == jnp.float32
    w = np.asarray(w_q, np.float64) * np.asarray(w_scale)
    if layout == "in cache":  # f32 activations: the converted weight is dotted in f32
        bound = F32_DOT_ERROR * dot_magnitude(x, w)
    else:  # split activations, one int8 dot (the kernel's, for few rows of a packed weight)
        bound = split_bound(x, np.abs(w)) + F32_DOT_ERROR * dot_magnitude(x, w)
    assert_within(on_cpu, expected, bound, f"int8 xla, {layout}")


@pytest.mark.parametrize("matmul", ["int8", "w8a8"])
def test_pallas_kernels_name_a_weight_packed_for_the_cpu_kernel(rng, matmul):
    x = activations(rng, 4, 96)
    w_q, w_scale = int8_weight(rng, 96, 64)
    call = int8_matmul if matmul == "int8" else w8a8_matmul
    with pytest.raises(ValueError, match="got a PackedInt8: a weight packed for the CPU kernel .* "
                                         "implementation='xla'"):
        call(x, cpu_int8_dot.pack(w_q), w_scale, implementation=PALLAS_MODE)
    # The check reads any [K, N] array, numpy's too.
    np.testing.assert_array_equal(np.asarray(call(x, np.asarray(w_q), w_scale, implementation=PALLAS_MODE)),
                                  np.asarray(call(x, w_q, w_scale, implementation=PALLAS_MODE)))


@pytest.mark.parametrize("m", [5, 40])  # dotted in f32 / in bf16 with f32 accumulation
def test_int8_matmul_bf16_activations(rng, m):
    k, n = 160, 48
    x = activations(rng, m, k, jnp.bfloat16)
    w_q, w_scale = int8_weight(rng, k, n)
    expected = int8_matmul(x, w_q, w_scale, implementation="reference")
    w = np.asarray(w_q, np.float64) * np.asarray(w_scale)
    for implementation in (PALLAS_MODE, "xla"):
        out = int8_matmul(x, w_q, w_scale, implementation=implementation)
        assert out.dtype == jnp.bfloat16
        bound = split_bound(x, np.abs(w)) + 2 * BF16_ERROR * np.abs(np.asarray(expected, np.float64)) + F32_DOT_ERROR * dot_magnitude(x, w)
        assert_within(out, expected, bound, f"int8 bf16 {implementation}")


# ---- int4 group-wise (W4A16) -------------------------------------------------------------------


def int4_weight(rng, k, n, group_size):
    codes = jnp.asarray(rng.integers(0, 16, (k, n)), jnp.uint8)
    scale = jnp.asarray(rng.uniform(0.5, 2.0, (k // group_size, n)) / 100, jnp.float16)
    offset = jnp.asarray(-rng.uniform(6, 9, (k // group_size, n)) / 100, jnp.float16)
    return pack_int4(codes, group_size), scale, offset


@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("m", ROWS)
def test_int4_matmul_pallas_matches_reference(rng, m, group_size):
    k, n = 128, 48
    x = activations(rng, m, k)
    packed, scale, offset = int4_weight(rng, k, n, group_size)
    expected = int4_matmul(x, packed, scale, offset, implementation="reference")
    interpreted = int4_matmul(x, packed, scale, offset, implementation=PALLAS_MODE)
    assert interpreted.shape == (m, n) and interpreted.dtype == jnp.float32
    w = dequantize_int4(packed, scale, offset, jnp.float32)
    assert_within(interpreted, expected, F32_DOT_ERROR * dot_magnitude(x, w), f"int4 {PALLAS_MODE}")


@pytest.mark.parametrize("weight_in_cache", [True, False])
@pytest.mark.parametrize("m", ROWS)
def test_int4_matmul_on_cpu_matches_reference(rng, monkeypatch, m, weight_in_cache):
    if not weight_in_cache:
        monkeypatch.setattr(xla_cpu, "CACHE_RESIDENT_BYTES", 0)
    k, n, group_size = 128, 48, 32
    x = activations(rng, m, k)
    packed, scale, offset = int4_weight(rng, k, n, group_size)
    expected = int4_matmul(x, packed, scale, offset, implementation="reference")
    on_cpu = int4_matmul(x, packed, scale, offset, implementation=None)
    assert on_cpu.shape == (m, n) and on_cpu.dtype == jnp.float32
    w = dequantize_int4(packed, scale, offset, jnp.float32)
    if not weight_in_cache and m <= SPLIT_DOT_MAX_ROWS:  # split x times codes * scale (at most 15 * scale)
        code_magnitude = 15 * np.repeat(np.asarray(scale, np.float64), group_size, axis=0)
        bound = split_bound(x, code_magnitude) + F32_DOT_ERROR * dot_magnitude(x, w)
    else:  # f32 activations: the dequantized weight is dotted in f32
        bound = 2 * F32_DOT_ERROR * dot_magnitude(x, w)
    assert_within(on_cpu, expected, bound, "int4 xla")


def test_int4_matmul_bf16_activations(rng):
    k, n, group_size = 128, 32, 64
    x = activations(rng, 3, k, jnp.bfloat16)
    packed, scale, offset = int4_weight(rng, k, n, group_size)
    expected = int4_matmul(x, packed, scale, offset, implementation="reference")
    out = int4_matmul(x, packed, scale, offset, implementation=PALLAS_MODE)
    assert out.dtype == jnp.bfloat16
    w = dequantize_int4(packed, scale, offset, jnp.float32)
    assert_within(out, expected, BF16_ERROR * dot_magnitude(x, w), f"int4 bf16 {PALLAS_MODE}")


# ---- W8A8: int8 and fp8 ------------------------------------------------------------------------


def w8a8_weight(rng, k, n, kind):
    if kind == "int8":
        return int8_weight(rng, k, n)
    w_q = jnp.asarray(rng.standard_normal((k, n)) * 100, jnp.float8_e4m3fn)
    if kind == "fp8 per-tensor":
        return w_q, jnp.float32(rng.uniform(0.5, 2.0) / 448)
    return w_q, jnp.asarray(rng.uniform(0.5, 2.0, n) / 448, jnp.float32)


@pytest.mark.parametrize("kind", ["int8", "fp8 per-channel", "fp8 per-tensor"])
@pytest.mark.parametrize("m", ROWS)
def test_w8a8_matmul_pallas_and_xla_match_reference(rng, m, kind):
    k, n = 96, 64
    x = activations(rng, m, k)
    w_q, w_scale = w8a8_weight(rng, k, n, kind)
    expected = w8a8_matmul(x, w_q, w_scale, implementation="reference")
    x_q, x_scale = activation_quant.quantize_per_token(x, w_q.dtype)
    # Same quantized activations on every path: only the accumulation order may differ (fp8).
    magnitude = dot_magnitude(np.asarray(x_q, np.float64) * np.asarray(x_scale)[:, None], np.asarray(w_q, np.float64) * np.asarray(w_scale))
    runs = [(PALLAS_MODE, w_q), ("xla", w_q)] + ([("xla", cpu_int8_dot.pack(w_q))] if kind == "int8" else [])
    for implementation, stored in runs:
        out = w8a8_matmul(x, stored, w_scale, implementation=implementation)
        assert out.shape == (m, n) and out.dtype == jnp.float32
        assert_within(out, expected, F32_DOT_ERROR * magnitude,
                      f"{kind} {implementation}{' packed' if cpu_int8_dot.is_packed(stored) else ''}")


def test_w8a8_matmul_bf16_activations(rng):
    k, n = 96, 32
    x = activations(rng, 5, k, jnp.bfloat16)
    w_q, w_scale = w8a8_weight(rng, k, n, "int8")
    expected = w8a8_matmul(x, w_q, w_scale, implementation="reference")
    for implementation in (PALLAS_MODE, "xla"):
        out = w8a8_matmul(x, w_q, w_scale, implementation=implementation)
        assert out.dtype == jnp.bfloat16
        assert_within(out, expected, BF16_ERROR * np.abs(np.asarray(expected, np.float64)), f"w8a8 bf16 {implementation}")


def test_pallas_kernel_rejects_untileable_width(rng):
    w_q, w_scale = int8_weight(rng, 96, 40)  # 40 is not a multiple of 16
    with pytest.raises(ValueError, match="multiple of 16"):
        int8_matmul(activations(rng, 2, 96), w_q, w_scale, implementation=PALLAS_MODE)


# ---- GPU lowering without a GPU ----------------------------------------------------------------


def _lower_for_h100(fn, *arg_specs):
    """Lowers `fn` for CUDA against an abstract H100: runs the Pallas -> Triton IR lowering, not ptxas."""
    if not hasattr(jax.sharding, "AbstractDevice"):
        pytest.skip("this jax has no jax.sharding.AbstractDevice to lower against")
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
        return jax.jit(fn).trace(*arg_specs).lower(lowering_platforms=("cuda",)).as_text()


# jax 0.12 announces that Pallas' Triton backend will give way to Mosaic GPU; it still lowers.
@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("m", [1, 40])
@pytest.mark.parametrize("kind", ["int8", "int4", "w8a8", "fp8"])
def test_pallas_kernels_lower_to_triton_for_cuda(m, kind):
    k, n = 576, 1536  # SmolLM2's q/gate/up projections
    spec = jax.ShapeDtypeStruct
    x = spec((m, k), jnp.bfloat16)
    if kind == "int8":
        text = _lower_for_h100(int8_matmul_pallas, x, spec((k, n), jnp.int8), spec((n,), jnp.float32))
    elif kind == "int4":
        groups = spec((k // 64, n), jnp.float16)
        text = _lower_for_h100(int4_matmul_pallas, x, spec((k // 2, n), jnp.uint8), groups, groups)
    else:
        w_dtype = jnp.int8 if kind == "w8a8" else jnp.float8_e4m3fn
        text = _lower_for_h100(functools.partial(w8a8_matmul, implementation="pallas"), x, spec((k, n), w_dtype), spec((n,), jnp.float32))
    assert "triton" in text
