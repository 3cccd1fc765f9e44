"""The C++ int8 x int8 -> int32 kernel for CPUs (pallas_kernels/cpu_int8_dot.{cc,py}) against exact
integer math: every tile shape it has (16-column tiles, 1-4 row blocks, the K % 4 and N % 16
tails), the full int8 range, and sums past float32's exact range."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import cpu_int8_dot

pytestmark = pytest.mark.skipif(not cpu_int8_dot.available(),
                                reason="needs an x86-64 CPU with AVX-512 VNNI and a C++ compiler")


def exact(x_q: np.ndarray, w_q: np.ndarray) -> np.ndarray:
    return x_q.astype(np.int64) @ w_q.astype(np.int64)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("k, n", [(576, 960), (131, 77), (4, 16), (1536, 48), (6, 200)])
def test_kernel_is_exact_integer_math_over_the_full_int8_range(rng, m, k, n):
    x_q = rng.integers(-128, 128, (m, k)).astype(np.int8)
    w_q = rng.integers(-128, 128, (k, n)).astype(np.int8)
    got = jax.jit(cpu_int8_dot.int8_dot)(x_q, w_q)
    assert got.dtype == jnp.int32 and got.shape == (m, n)
    np.testing.assert_array_equal(np.asarray(got), exact(x_q, w_q))


def test_kernel_accumulates_past_float32_precision(rng):
    x_q = rng.integers(100, 128, (3, 4096)).astype(np.int8)
    w_q = rng.integers(100, 128, (4096, 64)).astype(np.int8)
    expected = exact(x_q, w_q)
    assert expected.min() > 2**24
    np.testing.assert_array_equal(np.asarray(cpu_int8_dot.int8_dot(x_q, w_q)), expected)


@pytest.mark.parametrize("m", [1, cpu_int8_dot.MAX_ROWS, cpu_int8_dot.MAX_ROWS + 1, 40])
def test_fastest_dot_uses_the_kernel_up_to_max_rows_and_is_exact_either_way(rng, m):
    x_q = rng.integers(-127, 128, (m, 96)).astype(np.int8)
    w_q = rng.integers(-127, 128, (96, 48)).astype(np.int8)
    hlo = jax.jit(cpu_int8_dot.fastest_int8_dot).lower(x_q, w_q).as_text()
    assert (cpu_int8_dot.TARGET in hlo) == (m <= cpu_int8_dot.MAX_ROWS)
    np.testing.assert_array_equal(np.asarray(cpu_int8_dot.fastest_int8_dot(x_q, w_q)), exact(x_q, w_q))


def test_kernel_refuses_operands_that_are_not_int8_matrices(rng):
    with pytest.raises(ValueError, match=r"x \[M, K\] and w \[K, N\] int8"):
        cpu_int8_dot.int8_dot(np.zeros((2, 8), np.int8), np.zeros((6, 16), np.int8))
    with pytest.raises(ValueError, match="int8"):
        cpu_int8_dot.int8_dot(np.zeros((2, 8), np.float32), np.zeros((8, 16), np.int8))
