"""The C++ int8 x int8 -> int32 kernel for CPUs (pallas_kernels/cpu_int8_dot.{cc,py}) against exact
integer math: its packed weight layout, every row block it has (1-4 rows, and more rows in blocks),
the full int8 range, sums past float32's exact range, the fused W8A8 call and its live-row count (an
engine step's real tokens), and the choice between it and XLA's dot."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.errors import EngineError
from pallas_kernels import cpu_ffi, cpu_int8_dot
from pallas_kernels.activation_quant import quantize_per_token
from pallas_kernels.w8a8_matmul import w8a8_matmul

needs_kernel = pytest.mark.skipif(not cpu_int8_dot.available(),
                                  reason="needs an x86-64 CPU with AVX2 and a C++ compiler")


def exact(x_q: np.ndarray, w_q: np.ndarray) -> np.ndarray:
    return x_q.astype(np.int64) @ w_q.astype(np.int64)


def test_pack_is_the_documented_layout_and_unpack_inverts_it(rng):
    w_q = rng.integers(-128, 128, (12, 8)).astype(np.int8)
    packed = cpu_int8_dot.pack(jnp.asarray(w_q))
    codes = np.asarray(packed.codes)
    assert codes.shape == (2, 4, 12) and packed.dtype == jnp.int8
    b, c, k = 1, 2, 5
    assert codes[b, c, k] == w_q[k, 4 * b + c]
    assert packed.sums.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(packed.sums), w_q.astype(np.int64).sum(axis=0))
    assert cpu_int8_dot.is_packed(packed) and not cpu_int8_dot.is_packed(jnp.asarray(w_q))
    np.testing.assert_array_equal(np.asarray(cpu_int8_dot.unpack(packed)), w_q)
    np.testing.assert_array_equal(np.asarray(cpu_int8_dot.output_major(packed)), w_q.T)
    assert cpu_int8_dot.logical_shape(packed) == (12, 8)
    with pytest.raises(ValueError, match="multiple of 4"):
        cpu_int8_dot.pack(jnp.zeros((12, 10), jnp.int8))


@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 16, 17, 40])
@pytest.mark.parametrize("k, n", [(576, 960), (132, 96), (4, 32), (1536, 64), (100, 12)])
def test_kernel_is_exact_integer_math_over_the_full_int8_range(rng, m, k, n):
    x_q = rng.integers(-128, 128, (m, k)).astype(np.int8)
    w_q = rng.integers(-128, 128, (k, n)).astype(np.int8)
    got = jax.jit(cpu_int8_dot.int8_dot)(x_q, cpu_int8_dot.pack(jnp.asarray(w_q)))
    assert got.dtype == jnp.int32 and got.shape == (m, n)
    np.testing.assert_array_equal(np.asarray(got), exact(x_q, w_q))


@needs_kernel
def test_kernel_accumulates_past_float32_precision(rng):
    x_q = rng.integers(100, 128, (3, 4096)).astype(np.int8)
    w_q = rng.integers(100, 128, (4096, 64)).astype(np.int8)
    expected = exact(x_q, w_q)
    assert expected.min() > 2**24
    got = cpu_int8_dot.int8_dot(x_q, cpu_int8_dot.pack(jnp.asarray(w_q)))
    np.testing.assert_array_equal(np.asarray(got), expected)


@needs_kernel
@pytest.mark.parametrize("m", [1, 3, 4, 9, cpu_int8_dot.max_rows()])
@pytest.mark.parametrize("k, n", [(576, 960), (132, 96)])
def test_fused_w8a8_quantizes_each_row_like_quantize_per_token_then_dots_exactly(rng, m, k, n):
    """Rows of very different ranges, one of them all zero; the weight spans several work items (960
    outputs: 240 blocks of 4, 15 items), so the pool's threads share it."""
    x = (rng.standard_normal((m, k)) * rng.uniform(1e-3, 1e3, (m, 1))).astype(np.float32)
    x[m // 2] = 0.0
    w_q = rng.integers(-127, 128, (k, n)).astype(np.int8)
    w_scale = rng.uniform(1e-4, 1e-2, n).astype(np.float32)
    got = np.asarray(jax.jit(cpu_int8_dot.w8a8_dot)(x, cpu_int8_dot.pack(jnp.asarray(w_q)), w_scale))
    x_q, x_scale = (np.asarray(a) for a in quantize_per_token(jnp.asarray(x), jnp.int8))
    expected = exact(x_q, w_q) * x_scale.astype(np.float64)[:, None] * w_scale[None, :]
    assert got.dtype == np.float32 and got.shape == (m, n)
    np.testing.assert_array_equal(got[m // 2], 0.0)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)


@needs_kernel
@pytest.mark.parametrize("m, live", [(cpu_int8_dot.max_rows(), 5), (3, 1), (3, 0), (3, 99)])
def test_fused_w8a8_computes_only_the_live_rows(rng, m, live):
    """An engine step passes its real tokens' count: the first `live` rows (clamped to [0, M]) come
    out as a call on those rows alone, bit for bit, and the bucket's padding rows as zeros."""
    x = jnp.asarray(rng.standard_normal((m, 576)), jnp.float32)
    w = cpu_int8_dot.pack(jnp.asarray(rng.integers(-127, 128, (576, 96)), jnp.int8))
    w_scale = jnp.asarray(rng.uniform(1e-3, 1e-2, 96), jnp.float32)
    rows = min(live, m)
    got = np.asarray(jax.jit(cpu_int8_dot.w8a8_dot)(x, w, w_scale, jnp.int32(live)))
    assert not got[rows:].any()
    if rows:
        np.testing.assert_array_equal(got[:rows], np.asarray(cpu_int8_dot.w8a8_dot(x[:rows], w, w_scale)))
    with pytest.raises(Exception, match="live-row count"):
        jax.ffi.ffi_call(cpu_int8_dot.W8A8_TARGET, jax.ShapeDtypeStruct((m, 96), jnp.float32))(
            x, w.codes, w.sums, w_scale, jnp.zeros((0,), jnp.int32)).block_until_ready()


@needs_kernel
@pytest.mark.parametrize("m, fused", [(1, True), (cpu_int8_dot.max_rows(), True), (cpu_int8_dot.max_rows() + 1, False)])
def test_w8a8_matmul_makes_one_kernel_call_on_packed_weights_up_to_max_rows(rng, m, fused):
    x = jnp.asarray(rng.standard_normal((m, 96)), jnp.float32)
    w_q = jnp.asarray(rng.integers(-127, 128, (96, 64)), jnp.int8)
    w_scale = jnp.asarray(rng.uniform(1e-3, 1e-2, 64), jnp.float32)
    hlo = jax.jit(w8a8_matmul).lower(x, cpu_int8_dot.pack(w_q), w_scale).as_text()
    assert (cpu_int8_dot.W8A8_TARGET in hlo) == fused
    np.testing.assert_allclose(np.asarray(w8a8_matmul(x, cpu_int8_dot.pack(w_q), w_scale)),
                               np.asarray(w8a8_matmul(x, w_q, w_scale, implementation="reference")), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("m", [1, cpu_int8_dot.max_rows(), cpu_int8_dot.max_rows() + 1, 40])
def test_fastest_dot_runs_the_kernel_on_packed_weights_up_to_max_rows_and_is_exact_either_way(rng, m, packed):
    x_q = rng.integers(-127, 128, (m, 96)).astype(np.int8)
    w_q = rng.integers(-127, 128, (96, 64)).astype(np.int8)
    w = cpu_int8_dot.pack(jnp.asarray(w_q)) if packed else jnp.asarray(w_q)
    hlo = jax.jit(cpu_int8_dot.fastest_int8_dot).lower(x_q, w).as_text()
    expect_kernel = packed and m <= cpu_int8_dot.max_rows() and cpu_int8_dot.available()
    assert (cpu_int8_dot.TARGET in hlo) == expect_kernel
    np.testing.assert_array_equal(np.asarray(cpu_int8_dot.fastest_int8_dot(x_q, w)), exact(x_q, w_q))


def test_more_rows_than_the_kernel_serves_read_the_packed_weight_without_a_copy(rng):
    """Prefill: XLA's dot takes the packed bytes as [N, K]; the compiled program copies no weight."""
    x_q = rng.integers(-127, 128, (cpu_int8_dot.max_rows() + 1, 576)).astype(np.int8)
    w = cpu_int8_dot.pack(jnp.asarray(rng.integers(-127, 128, (576, 192)).astype(np.int8)))
    compiled = jax.jit(cpu_int8_dot.fastest_int8_dot).lower(x_q, w).compile().as_text()
    weight_copies = [line for line in compiled.splitlines()
                     if "s8[192,576]" in line and ("copy" in line or "transpose" in line)]
    assert not weight_copies


def test_kernel_refuses_operands_it_cannot_read(rng):
    w = cpu_int8_dot.pack(jnp.asarray(rng.integers(-127, 128, (8, 32)), jnp.int8))
    with pytest.raises(ValueError, match="packed by cpu_int8_dot.pack .* got a ndarray"):
        cpu_int8_dot.int8_dot(np.zeros((2, 8), np.int8), np.zeros((8, 32), np.int8))
    with pytest.raises(ValueError, match="for x's K = 6"):
        cpu_int8_dot.int8_dot(np.zeros((2, 6), np.int8), w)
    with pytest.raises(ValueError, match=r"got codes \(8, 4, 8\) int8, sums \(31,\) int32"):
        cpu_int8_dot.int8_dot(np.zeros((2, 8), np.int8), cpu_int8_dot.PackedInt8(w.codes, w.sums[1:]))
    with pytest.raises(ValueError, match="x \\[M, K\\] int8"):
        cpu_int8_dot.int8_dot(np.zeros((2, 8), np.float32), w)
    with pytest.raises(ValueError, match="packed by cpu_int8_dot.pack"):
        cpu_int8_dot.w8a8_dot(np.zeros((2, 8), np.float32), cpu_int8_dot.unpack(w), jnp.ones(32))


@needs_kernel
def test_the_kernel_itself_refuses_sums_of_another_width(rng):
    w = cpu_int8_dot.pack(jnp.asarray(rng.integers(-127, 128, (8, 32)), jnp.int8))
    x_q = jnp.asarray(rng.integers(-127, 128, (2, 8)), jnp.int8)
    with pytest.raises(Exception, match=r"sums \[N\] s32"):
        jax.ffi.ffi_call(cpu_int8_dot.TARGET, jax.ShapeDtypeStruct((2, 32), jnp.int32))(
            x_q, w.codes, w.sums[:16]).block_until_ready()


def test_a_failed_build_warns_and_leaves_the_int8_dot_to_xla(monkeypatch, tmp_path, rng):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no cached build here
    monkeypatch.setattr(cpu_ffi, "_compiler", lambda: "false")  # a "compiler" that always fails
    monkeypatch.setattr(cpu_ffi, "cpu_flags", lambda: cpu_int8_dot.KERNEL.cpu_flags)
    monkeypatch.setattr(cpu_ffi.platform, "machine", lambda: "x86_64")
    cpu_int8_dot.KERNEL.forget()
    try:
        with pytest.warns(UserWarning, match="building the CPU int8 kernel failed"):
            assert not cpu_int8_dot.available()
        x_q = rng.integers(-127, 128, (1, 64)).astype(np.int8)
        w_q = rng.integers(-127, 128, (64, 32)).astype(np.int8)
        w = cpu_int8_dot.pack(jnp.asarray(w_q))
        assert cpu_int8_dot.TARGET not in jax.jit(cpu_int8_dot.fastest_int8_dot).lower(x_q, w).as_text()
        np.testing.assert_array_equal(np.asarray(cpu_int8_dot.fastest_int8_dot(x_q, w)), exact(x_q, w_q))
        with pytest.raises(EngineError, match="rebuilt here with `jaxinfer build`"):
            cpu_int8_dot.ensure_registered()
    finally:
        cpu_int8_dot.KERNEL.forget()
