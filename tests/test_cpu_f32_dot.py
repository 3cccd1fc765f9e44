"""The float32 few-row CPU kernel (pallas_kernels/cpu_f32_dot.{cc,py}) against float64 numpy on
every path of its loop (K rows in passes of eight and a remainder, one or several K slabs, one or
several column tiles with a partial last one), and the step's routing of float32 weights to it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.model.layers import linear
from jaxinfer.runner.step import KernelDenseWeight, route_dense_weights
from pallas_kernels import cpu_f32_dot

needs_kernel = pytest.mark.skipif(not cpu_f32_dot.available(),
                                  reason="needs an x86-64 CPU with AVX-512F and a C++ compiler")


def random_problem(rng, m: int, k: int, n: int):
    x = (rng.standard_normal((m, k)) * rng.uniform(0.1, 10, (1, k))).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    return x, w


@needs_kernel
@pytest.mark.parametrize("k, n", [(37, 16), (576, 960), (1536, 576), (200, 4112), (64, 8240)])
def test_kernel_matches_float64_matmul(rng, k, n):
    for m in range(1, cpu_f32_dot.MAX_ROWS + 1):
        x, w = random_problem(rng, m, k, n)
        want = x.astype(np.float64) @ w.astype(np.float64)
        got = np.asarray(jax.jit(cpu_f32_dot.f32_dot)(jnp.asarray(x), jnp.asarray(w)))
        # float32 sums in another order: within a few ulps of the sum of magnitudes
        bound = 1e-6 * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64))
        assert np.all(np.abs(got - want) <= bound), (m, np.max(np.abs(got - want) / bound))


@needs_kernel
def test_kernel_refuses_shapes_it_does_not_take(rng):
    x, w = random_problem(rng, 2, 32, 24)
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu_f32_dot.f32_dot(jnp.asarray(x), jnp.asarray(w))
    x, w = random_problem(rng, cpu_f32_dot.MAX_ROWS + 1, 32, 32)
    with pytest.raises(ValueError, match="1 <= M <= 8"):
        cpu_f32_dot.f32_dot(jnp.asarray(x), jnp.asarray(w))
    assert not cpu_f32_dot.serves(1, jnp.zeros((32, 32), jnp.bfloat16))


@needs_kernel
def test_kernel_weight_runs_few_rows_in_the_kernel_and_more_in_xla(rng):
    _, w = random_problem(rng, 1, 96, 64)
    weight = KernelDenseWeight(jnp.asarray(w))
    for shape in [(3, 96), (2, 2, 96), (cpu_f32_dot.MAX_ROWS + 1, 96)]:
        x = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
        hlo = jax.jit(weight.matmul).lower(x).as_text()
        rows = int(np.prod(shape[:-1]))
        assert (cpu_f32_dot.TARGET in hlo) == (rows <= cpu_f32_dot.MAX_ROWS)
        np.testing.assert_allclose(np.asarray(weight.matmul(x)), np.asarray(linear(x, jnp.asarray(w))),
                                   rtol=1e-5, atol=1e-5)


@needs_kernel
def test_routing_wraps_float32_matmul_weights_on_one_device_only(rng):
    layer = {"attn_norm": jnp.ones(32), "w_qkv": jnp.zeros((32, 96)), "wo": jnp.zeros((64, 32)),
             "w_gate_up": jnp.zeros((32, 128)), "w_down": jnp.zeros((64, 32)).astype(jnp.bfloat16)}
    params = {"embed": jnp.zeros((32, 160)), "final_norm": jnp.ones(32), "layers": [layer]}
    routed = route_dense_weights(params, num_devices=1)
    kinds = {name: type(w).__name__ for name, w in routed["layers"][0].items()}
    assert kinds == {"attn_norm": "ArrayImpl", "w_qkv": "KernelDenseWeight", "wo": "KernelDenseWeight",
                     "w_gate_up": "KernelDenseWeight", "w_down": "ArrayImpl"}
    assert routed["lm_head"].w is params["embed"] and routed["embed"] is params["embed"]
    assert route_dense_weights(params, num_devices=2) is params
