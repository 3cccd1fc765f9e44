"""The dense CPU matmul kernel (pallas_kernels/cpu_dense_dot.{cc,py}) against float64 numpy on
every path of its FMA loop (K rows in passes of eight and a remainder, one or several K slabs, one
or several column tiles with a partial last one, row chunks of eight; for one row, K rows in runs
walked at once, with rows past the last whole run and slabs shorter than one row per run) for
float32 and bfloat16 weights, on its GEMM loop for bfloat16 in the AVX2 build (row blocks, panels, K passes), on its AMX
loop for bfloat16 (full and partial groups of 16 and 32 rows, panels of one to eight per item) and
on its AVX512-BF16 loop (passes of 4 (k, k + 1) pairs and single pairs,
32-column steps and a last 16, chunks of up to 8 rows and walks of 9-24, K slabs and column tiles), on the CPUs that have
them, and the step's routing of float32 and bfloat16 weights to it; its SwiGLU (AMX items, slabbed
products, the FMA loop) against float64 and the MLP's unfused path, and swiglu's use of it; its
residual add and RMSNorm against float64 and the unfused path, and residual_rms_norm's use of it; its
qkv split and RoPE against float64 and the unfused path, and the model's use of it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from types import SimpleNamespace

from jaxinfer.model import llama
from jaxinfer.model.layers import linear, residual_rms_norm, rope_cos_sin, swiglu
from jaxinfer.runner.step import KernelDenseWeight, route_dense_weights
from pallas_kernels import cpu_dense_dot

needs_kernel = pytest.mark.skipif(not cpu_dense_dot.available(),
                                  reason="needs an x86-64 CPU with AVX2 and a C++ compiler")


def skip_unless_the_kernel_takes(rows: int, w) -> None:
    """Skips a bfloat16 case of more rows than this CPU's kernel takes: up to MAX_DP_ROWS on CPUs with
    AVX512-BF16 but no AMX (Zen 4), whose larger steps XLA's dot runs (the routing tests check that)."""
    if not cpu_dense_dot.serves(rows, w):
        pytest.skip(f"this CPU's kernel does not take bfloat16 steps of {rows} rows; XLA runs them")


def random_problem(rng, m: int, k: int, n: int, dtype=jnp.float32):
    """x [m, k] and w [k, n] in dtype, as jax arrays, and both exactly in float64."""
    x = (rng.standard_normal((m, k)) * rng.uniform(0.1, 10, (1, k))).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    x, w = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
    return x, w, np.asarray(x.astype(jnp.float32), np.float64), np.asarray(w.astype(jnp.float32), np.float64)


def assert_matches_float64(x, w, x64, w64):
    got = np.asarray(jax.jit(cpu_dense_dot.dense_dot)(x, w))
    want = x64 @ w64
    # float32 sums in another order: within a few ulps of the sum of magnitudes
    bound = 1e-6 * (np.abs(x64) @ np.abs(w64))
    assert got.dtype == np.float32 and np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
# n = 2048: rows 4 or 8 KB apart, which the loop walks without prefetching the rows ahead; (96, 1024):
# three K slabs, whose partial sums' rows are padded off the 4 KB multiples.
@pytest.mark.parametrize("k, n", [(5, 16), (37, 16), (576, 960), (1536, 576), (200, 4112), (64, 8240), (48, 2048),
                                  (96, 1024)])
def test_fma_loop_matches_float64_matmul(rng, k, n, dtype):
    for m in range(1, cpu_dense_dot.MAX_FMA_ROWS + 1):
        assert_matches_float64(*random_problem(rng, m, k, n, dtype))


@needs_kernel
@pytest.mark.parametrize("m, k, n", [(20, 37, 48), (11, 576, 80)])
def test_fma_loop_takes_bfloat16_rows_in_chunks_where_amx_does_not_fit(rng, m, k, n):
    """K or N off AMX's tile multiples: rows beyond eight run through the FMA loop in chunks."""
    if not cpu_dense_dot.AMX_BF16:
        pytest.skip("without AMX-BF16, bfloat16 steps beyond 8 rows take the GEMM loop (AVX2 build) or XLA's dot")
    assert_matches_float64(*random_problem(rng, m, k, n, jnp.bfloat16))


@needs_kernel
@pytest.mark.skipif(not cpu_dense_dot.AMX_BF16, reason="needs a CPU with AMX-BF16")
@pytest.mark.parametrize("m, k, n", [(8, 64, 32), (9, 576, 960), (16, 32, 64), (17, 576, 576), (32, 1536, 576), (20, 96, 2080),
                                     (45, 96, 3072), (130, 576, 256), (256, 64, 8192)])
def test_amx_loop_matches_float64_matmul(rng, m, k, n):
    assert_matches_float64(*random_problem(rng, m, k, n, jnp.bfloat16))


@needs_kernel
@pytest.mark.skipif(not cpu_dense_dot.AMX_BF16, reason="needs a CPU with AMX-BF16")
@pytest.mark.parametrize("m, k, n", [(3, 64, 32), (8, 64, 64), (32, 576, 3072), (33, 576, 3072), (200, 96, 160),
                                     (256, 576, 3072)])
def test_fused_swiglu_matches_the_unfused_mlp_half(rng, m, k, n):
    # Rows below 8 (the FMA loop), slabbed AMX (up to 32 rows: the SwiGLU after the slabs' sum) and
    # the AMX loop's tile stores (partial row groups at 33 and 200 rows).
    x, w, x64, w64 = random_problem(rng, m, k, n, jnp.bfloat16)
    weight = KernelDenseWeight(w)
    assert weight.fuses_swiglu(x)
    fused = np.asarray(jax.jit(weight.swiglu)(x)).astype(np.float64)
    assert fused.shape == (m, n // 2)
    # The float64 oracle: silu(gate) * up of the product, gate and up rounded to bfloat16 first.
    product = (x64 @ w64).astype(jnp.bfloat16).astype(np.float64)
    gate, up = product[:, 0::2], product[:, 1::2]
    want = gate * np.exp(-np.logaddexp(0.0, -gate)) * up  # sigmoid without overflow
    # bfloat16 rounding of gate, up (the kernel's float32 sums may round to the next value) and the result.
    np.testing.assert_allclose(fused, want, rtol=2**-6, atol=2**-12 * np.abs(want).max())
    # swiglu's unfused path on the same product: linear's bfloat16 gate and up, then silu in float32.
    gate_up = np.asarray(jax.jit(cpu_dense_dot.dense_dot)(x, w)).astype(jnp.bfloat16).astype(np.float32)
    gate32, up32 = gate_up[:, 0::2], gate_up[:, 1::2]
    unfused = (gate32 / (1 + np.exp(-gate32)) * up32).astype(jnp.bfloat16).astype(np.float64)
    np.testing.assert_allclose(fused, unfused, rtol=2**-7, atol=2**-12 * np.abs(unfused).max())


def test_swiglu_takes_the_fused_kernel_where_it_serves(rng):
    x, w, _, _ = random_problem(rng, 40, 64, 96, jnp.bfloat16)
    text = jax.jit(swiglu).lower(x, KernelDenseWeight(w)).as_text()
    assert (cpu_dense_dot.SWIGLU_TARGET in text) == (cpu_dense_dot.available() and cpu_dense_dot.serves_swiglu(40, w))
    assert cpu_dense_dot.SWIGLU_TARGET not in jax.jit(swiglu).lower(x, w).as_text()


def residual_norm_problem(rng, m: int, k: int, n: int):
    """bfloat16 x [m, k] and w [k, n], a float32 residual [m, n] of a default-model-like scale (up
    to thousands), a bfloat16 norm weight [n]."""
    x, w, x64, w64 = random_problem(rng, m, k, n, jnp.bfloat16)
    residual = jnp.asarray(rng.standard_normal((m, n)) * rng.uniform(1, 3000, (m, 1)), jnp.float32)
    norm_weight = jnp.asarray(rng.uniform(0.2, 3, n), jnp.bfloat16)
    return x, w, residual, norm_weight, x64, w64


@needs_kernel
@pytest.mark.parametrize("m, k, n", [(1, 576, 576), (3, 37, 48), (8, 1536, 576), (17, 64, 80), (40, 576, 576),
                                     (256, 1536, 576)])
def test_residual_add_and_rms_norm_match_float64(rng, m, k, n):
    """One row (the FMA loop's runs), a few (its row blocks), and beyond 8 (AMX, the GEMM loop or
    the FMA loop's chunks, by CPU); one item of the pass over rows and several (32 rows each)."""
    x, w, residual, norm_weight, x64, w64 = residual_norm_problem(rng, m, k, n)
    skip_unless_the_kernel_takes(m, w)
    eps = 1e-5
    total, normed = jax.jit(KernelDenseWeight(w).residual_norm, static_argnums=3)(x, residual, norm_weight, eps)
    assert total.dtype == jnp.float32 and normed.dtype == jnp.bfloat16 and normed.shape == (m, n)
    # The float64 oracle: the product rounded to bfloat16 (the kernel's float32 sums may round to the
    # neighbouring value), added to the residual, then the RMSNorm.
    product = (x64 @ w64).astype(jnp.bfloat16).astype(np.float64)
    want_total = np.asarray(residual, np.float64) + product
    bound = 2**-7 * (np.abs(x64) @ np.abs(w64)) + 2**-22 * np.abs(want_total)
    assert np.all(np.abs(np.asarray(total, np.float64) - want_total) <= bound)
    # The norm of the kernel's own sums (a product rounded to the neighbouring bfloat16 moves the sum
    # by a step, checked above): float64 against bfloat16's rounding of the result.
    total64 = np.asarray(total, np.float64)
    want = total64 / np.sqrt(np.mean(total64**2, axis=-1, keepdims=True) + eps) * np.asarray(
        norm_weight.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(np.asarray(normed, np.float64), want, rtol=2**-8, atol=1e-6)
    # The unfused path on the same weight: the same sums bit for bit where the products agree, the
    # norm within one bfloat16 step.
    unfused_total, unfused = jax.jit(residual_rms_norm, static_argnums=4)(residual, x, w, norm_weight, eps)
    assert np.mean(np.asarray(total) == np.asarray(unfused_total)) > 0.99
    np.testing.assert_allclose(np.asarray(normed, np.float32), np.asarray(unfused, np.float32), rtol=2**-7)


def test_residual_rms_norm_takes_the_fused_kernel_where_it_serves(rng):
    x, w, residual, norm_weight, _, _ = residual_norm_problem(rng, 40, 64, 96)

    def text(w):
        return jax.jit(residual_rms_norm, static_argnums=4).lower(residual, x, w, norm_weight, 1e-5).as_text()

    assert (cpu_dense_dot.ADD_NORM_TARGET in text(KernelDenseWeight(w))) == (
        cpu_dense_dot.available() and cpu_dense_dot.serves_add_norm(40, w))
    assert cpu_dense_dot.ADD_NORM_TARGET not in text(w)
    assert cpu_dense_dot.ADD_NORM_TARGET not in text(KernelDenseWeight(w.astype(jnp.float32)))


@needs_kernel
def test_residual_add_and_rms_norm_refuse_what_they_do_not_take(rng):
    x, w, residual, norm_weight, _, _ = residual_norm_problem(rng, 4, 32, 48)
    with pytest.raises(ValueError, match="float32 residual"):
        cpu_dense_dot.dense_add_norm(x, w, residual.astype(jnp.bfloat16), norm_weight, 1e-5)
    with pytest.raises(ValueError, match="norm weight"):
        cpu_dense_dot.dense_add_norm(x, w, residual, norm_weight[:16], 1e-5)
    with pytest.raises(ValueError, match="bfloat16 x"):
        cpu_dense_dot.dense_add_norm(x.astype(jnp.float32), w.astype(jnp.float32), residual, norm_weight, 1e-5)


def qkv_problem(rng, m: int, kv_heads: int, q_per_kv: int, head_dim: int, k: int = 96):
    """bfloat16 x [m, k] and a grouped qkv weight, the model config's head counts, and the cos and sin
    of random positions up to 4096 (so that rotations reach every angle)."""
    x, w, x64, w64 = random_problem(rng, m, k, kv_heads * (q_per_kv + 2) * head_dim, jnp.bfloat16)
    cfg = SimpleNamespace(num_kv_heads=kv_heads, q_per_kv=q_per_kv, head_dim=head_dim, num_heads=kv_heads * q_per_kv)
    inv_freq = (1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
    cos, sin = rope_cos_sin(jnp.asarray(rng.integers(0, 4096, m), jnp.int32), inv_freq)
    return x, w, cfg, cos, sin, x64, w64


@needs_kernel
@pytest.mark.parametrize("m, kv_heads, q_per_kv, head_dim", [(1, 3, 3, 64), (5, 2, 4, 32), (40, 3, 3, 64),
                                                             (70, 1, 1, 128)])
def test_qkv_split_and_rope_match_float64(rng, m, kv_heads, q_per_kv, head_dim):
    """One row, a few, several items of the pass over rows (32 rows each); heads of 32 to 128."""
    x, w, cfg, cos, sin, x64, w64 = qkv_problem(rng, m, kv_heads, q_per_kv, head_dim)
    skip_unless_the_kernel_takes(m, w)
    q, k, v = jax.jit(KernelDenseWeight(w).qkv_rope, static_argnums=(3, 4))(x, cos, sin, kv_heads, q_per_kv)
    assert q.shape == (m, kv_heads * q_per_kv, head_dim) and k.shape == v.shape == (m, kv_heads, head_dim)
    assert q.dtype == k.dtype == v.dtype == jnp.bfloat16
    # The float64 oracle: the product rounded to bfloat16 (the kernel's float32 sums may round to the
    # neighbouring value), grouped by kv head, q and k heads rotated by the half-split RoPE.
    product = (x64 @ w64).astype(jnp.bfloat16).astype(np.float64).reshape(m, kv_heads, q_per_kv + 2, head_dim)
    c, s = np.asarray(cos, np.float64)[:, None, :], np.asarray(sin, np.float64)[:, None, :]

    def rotate(heads):
        first, second = heads[..., :head_dim // 2], heads[..., head_dim // 2:]
        return np.concatenate([first * c - second * s, second * c + first * s], axis=-1)

    want_q = rotate(product[:, :, :q_per_kv].reshape(m, -1, head_dim))
    magnitude = (np.abs(x64) @ np.abs(w64)).max()
    for got, want in ((q, want_q), (k, rotate(product[:, :, q_per_kv])), (v, product[:, :, q_per_kv + 1])):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2**-7, atol=2**-8 * magnitude)
    # The unfused path on the same weight: the same values but for a rare rounding step.
    unfused = jax.jit(lambda x, layer: llama._project_qkv_rope(x, layer, cfg, cos, sin))(x, {"w_qkv": w})
    for got, want in zip((q, k, v), unfused):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.mean(got == want) > 0.99
        np.testing.assert_allclose(got, want, rtol=2**-7, atol=2**-7 * np.abs(want).max())


def test_the_model_takes_the_fused_qkv_kernel_where_it_serves(rng):
    x, w, cfg, cos, sin, _, _ = qkv_problem(rng, 40, 3, 3, 64)

    def text(layer):
        return jax.jit(lambda x, layer: llama._project_qkv_rope(x, layer, cfg, cos, sin)).lower(x, layer).as_text()

    serves = cpu_dense_dot.available() and cpu_dense_dot.serves_qkv_rope(40, w, 64)
    assert (cpu_dense_dot.QKV_ROPE_TARGET in text({"w_qkv": KernelDenseWeight(w)})) == serves
    assert cpu_dense_dot.QKV_ROPE_TARGET not in text({"w_qkv": w})
    # A qkv bias (Qwen2) is added before the rotation: the kernel does not take it.
    bias = jnp.asarray(rng.standard_normal(w.shape[1]), jnp.bfloat16)
    assert cpu_dense_dot.QKV_ROPE_TARGET not in text({"w_qkv": KernelDenseWeight(w), "b_qkv": bias})


@needs_kernel
def test_qkv_split_and_rope_refuse_what_they_do_not_take(rng):
    x, w, cfg, cos, sin, _, _ = qkv_problem(rng, 4, 3, 3, 64)
    with pytest.raises(ValueError, match="3 kv heads of 2 query heads"):
        cpu_dense_dot.dense_qkv_rope(x, w, cos, sin, 3, 2)
    with pytest.raises(ValueError, match="float32 cos and sin"):
        cpu_dense_dot.dense_qkv_rope(x, w, cos[:2], sin[:2], 3, 3)
    assert not cpu_dense_dot.serves_qkv_rope(4, w, 48)


@needs_kernel
@pytest.mark.skipif(not cpu_dense_dot.GEMM_BF16, reason="the GEMM loop is the AVX2 build's (CPUs without AVX-512)")
@pytest.mark.parametrize("m, k, n", [(9, 37, 16), (13, 576, 960), (17, 1536, 576), (24, 64, 48), (64, 1600, 80),
                                     (130, 576, 4112), (256, 96, 3072)])
def test_gemm_loop_matches_float64_matmul(rng, m, k, n):
    """Row blocks of six with a partial last one, one or several panels per item, K in one pass or
    two (beyond kGemmMaxDepth, the second adding to the first's sums)."""
    assert_matches_float64(*random_problem(rng, m, k, n, jnp.bfloat16))


@needs_kernel
@pytest.mark.skipif(not cpu_dense_dot.DP_BF16, reason="needs a CPU with AVX512-BF16 and without AMX-BF16")
@pytest.mark.parametrize("m, k, n", [(2, 2, 16), (5, 576, 960), (6, 64, 48), (7, 1536, 576), (8, 96, 112),
                                     (8, 576, 4112), (3, 38, 8240), (4, 200, 4112), (5, 96, 1024),
                                     (9, 64, 48), (13, 576, 960), (16, 1536, 576), (21, 38, 4112), (24, 96, 112)])
def test_avx512_bf16_loop_matches_float64_matmul(rng, m, k, n):
    assert_matches_float64(*random_problem(rng, m, k, n, jnp.bfloat16))


@needs_kernel
def test_kernel_refuses_shapes_and_dtypes_it_does_not_take(rng):
    x, w, _, _ = random_problem(rng, 2, 32, 24)
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu_dense_dot.dense_dot(x, w)
    x, w, _, _ = random_problem(rng, cpu_dense_dot.MAX_FMA_ROWS + 1, 32, 32)
    with pytest.raises(ValueError, match="1 <= M <= 8"):
        cpu_dense_dot.dense_dot(x, w)
    with pytest.raises(ValueError, match="of one dtype"):
        cpu_dense_dot.dense_dot(x[:2], w.astype(jnp.bfloat16))
    assert not cpu_dense_dot.serves(1, jnp.zeros((32, 32), jnp.float16))
    assert not cpu_dense_dot.serves(1, jnp.zeros((32, 32), jnp.int8))
    bf16 = jnp.zeros((32, 32), jnp.bfloat16)
    any_rows = cpu_dense_dot.AMX_BF16 or cpu_dense_dot.GEMM_BF16
    assert cpu_dense_dot.serves(64, bf16) == any_rows
    assert cpu_dense_dot.serves(cpu_dense_dot.MAX_DP_ROWS, bf16) == (any_rows or cpu_dense_dot.DP_BF16)
    assert cpu_dense_dot.serves(cpu_dense_dot.MAX_DP_ROWS + 1, bf16) == any_rows


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_weight_runs_the_rows_the_kernel_serves_there_and_the_rest_in_xla(rng, dtype):
    # As `linear` on the bare weight for activations in the weight's dtype, and float32 products
    # (the head's logits) for float32 activations against a bfloat16 weight.
    _, w, _, _ = random_problem(rng, 1, 96, 64, dtype)
    weight = KernelDenseWeight(w)
    for shape in [(3, 96), (2, 2, 96), (cpu_dense_dot.MAX_FMA_ROWS + 1, 96), (40, 96)]:
        x = jnp.asarray(rng.standard_normal(shape), dtype)
        hlo = jax.jit(weight.matmul).lower(x).as_text()
        rows = int(np.prod(shape[:-1]))
        assert (cpu_dense_dot.TARGET in hlo) == cpu_dense_dot.serves(rows, w)
        got = weight.matmul(x)
        assert got.dtype == dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(linear(x, w), np.float32),
                                   rtol=1e-2 if dtype == jnp.bfloat16 else 1e-5, atol=1e-5)
        got32 = weight.matmul(x.astype(jnp.float32))
        assert got32.dtype == jnp.float32
        want32 = jnp.einsum("...i,io->...o", x, w, preferred_element_type=jnp.float32)
        np.testing.assert_allclose(np.asarray(got32), np.asarray(want32), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_routing_wraps_dense_matmul_weights_on_one_device_only(rng):
    layer = {"attn_norm": jnp.ones(32), "w_qkv": jnp.zeros((32, 96)), "wo": jnp.zeros((64, 32)),
             "w_gate_up": jnp.zeros((32, 128), jnp.bfloat16), "w_down": jnp.zeros((64, 40))}
    params = {"embed": jnp.zeros((32, 160)), "final_norm": jnp.ones(32), "layers": [layer]}
    routed = route_dense_weights(params, num_devices=1)
    kinds = {name: type(w).__name__ for name, w in routed["layers"][0].items()}
    assert kinds == {"attn_norm": "ArrayImpl", "w_qkv": "KernelDenseWeight", "wo": "KernelDenseWeight",
                     "w_gate_up": "KernelDenseWeight", "w_down": "ArrayImpl"}
    assert routed["lm_head"].w is params["embed"] and routed["embed"] is params["embed"]
    assert route_dense_weights(params, num_devices=2) is params


@needs_kernel
def test_calls_from_several_threads_at_once_all_match(rng):
    """Decode-sized calls share one team of threads (cpu_thread_pool.h); a call that finds it busy
    with another's job uses XLA's pool instead. Eight threads calling at once must all be right."""
    import concurrent.futures

    problems = [random_problem(rng, 1 + i % 4, 576, 960) for i in range(8)]
    dot = jax.jit(cpu_dense_dot.dense_dot)

    def run(problem):
        x, w, x64, w64 = problem
        return [np.asarray(dot(x, w)) for _ in range(20)], x64 @ w64, np.abs(x64) @ np.abs(w64)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for results, want, magnitude in pool.map(run, problems):
            for got in results:
                assert np.all(np.abs(got - want) <= 1e-6 * magnitude)


def test_panels_hold_the_weight_and_give_it_back(rng):
    """pack_panels' layout (cpu_dense_dot.py): w[32 s + 2 i + e, 32 j + 16 h + c] at [j, s, h, i, c, e]."""
    w = rng.standard_normal((96, 160)).astype(np.float32)
    panels = cpu_dense_dot.pack_panels(w)
    assert panels.shape == (5, 3, 2, 16, 16, 2) and cpu_dense_dot.weight_shape(panels) == (96, 160)
    for j, s, h, i, c, e in [(0, 0, 0, 0, 0, 0), (4, 2, 1, 15, 15, 1), (2, 1, 0, 7, 3, 1), (3, 0, 1, 9, 12, 0)]:
        assert panels[j, s, h, i, c, e] == w[32 * s + 2 * i + e, 32 * j + 16 * h + c]
    np.testing.assert_array_equal(cpu_dense_dot.unpack_panels(panels), w)
    np.testing.assert_array_equal(jax.jit(cpu_dense_dot.unpack_panels)(jax.jit(cpu_dense_dot.pack_panels)(w)), w)
    assert cpu_dense_dot.packs_panels(jnp.zeros((96, 160), jnp.bfloat16))
    assert not cpu_dense_dot.packs_panels(jnp.zeros((96, 176), jnp.bfloat16))
    assert not cpu_dense_dot.packs_panels(jnp.zeros((80, 160), jnp.bfloat16))


@needs_kernel
@pytest.mark.parametrize("m, k, n", [(1, 576, 960), (3, 64, 32), (8, 1536, 576), (17, 96, 160), (33, 576, 3072),
                                     (130, 64, 2080)])
def test_kernel_takes_weights_as_panels_at_any_rows(rng, m, k, n):
    """AMX straight from the panels, one item's columns or many, 1 to 130 rows (on CPUs without AMX
    the call unpacks them first)."""
    x, w, x64, w64 = random_problem(rng, m, k, n, jnp.bfloat16)
    panels = cpu_dense_dot.pack_panels(w)
    assert cpu_dense_dot.serves(m, panels)
    assert_matches_float64(x, panels, x64, w64)


@needs_kernel
@pytest.mark.parametrize("m", [5, 40])
def test_fused_passes_take_weights_as_panels(rng, m):
    """The SwiGLU, residual-norm and qkv-RoPE calls on panels give what they give on the weight (the
    same sums beyond 32 rows, where both run AMX over all of K; within rounding below)."""
    same = 1.0 if m > 32 and cpu_dense_dot.AMX_BF16 else 0.99

    def agree(got, want):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert got.shape == want.shape and np.mean(got == want) >= same
        np.testing.assert_allclose(got, want, rtol=2**-7, atol=2**-7 * np.abs(want).max())

    x, w, residual, norm_weight, _, _ = residual_norm_problem(rng, m, 96, 160)
    skip_unless_the_kernel_takes(m, w)  # the weight itself, which the panels are compared with
    panels = cpu_dense_dot.pack_panels(w)
    for got, want in zip(cpu_dense_dot.dense_add_norm(x, panels, residual, norm_weight, 1e-5),
                         cpu_dense_dot.dense_add_norm(x, w, residual, norm_weight, 1e-5)):
        agree(got, want)
    if cpu_dense_dot.serves_swiglu(m, w):
        agree(cpu_dense_dot.dense_swiglu(x, panels), cpu_dense_dot.dense_swiglu(x, w))
    x, w, _, cos, sin, _, _ = qkv_problem(rng, m, 2, 3, 32)
    for got, want in zip(cpu_dense_dot.dense_qkv_rope(x, cpu_dense_dot.pack_panels(w), cos, sin, 2, 3),
                         cpu_dense_dot.dense_qkv_rope(x, w, cos, sin, 2, 3)):
        agree(got, want)


@needs_kernel
@pytest.mark.parametrize("m, live", [(8, 5), (40, 23), (40, 0), (40, 99)])
def test_calls_compute_only_the_live_rows(rng, m, live):
    """An engine step passes its real tokens' count: each call's first `live` rows (clamped to [0, M])
    come out as a call on those rows alone (the same loop, bit for bit) and the rest as zeros."""
    kv_heads, q_per_kv, head_dim = 3, 3, 64
    x, w, _, _ = random_problem(rng, m, 576, kv_heads * (q_per_kv + 2) * head_dim, jnp.bfloat16)
    skip_unless_the_kernel_takes(m, w)
    n = w.shape[1]
    residual = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    norm_weight = jnp.asarray(rng.uniform(0.2, 3, n), jnp.bfloat16)
    cos, sin = rope_cos_sin(jnp.asarray(rng.integers(0, 4096, m), jnp.int32),
                            (1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32))
    calls = {
        "dot": lambda rows, live_rows: cpu_dense_dot.dense_dot(x[:rows], w, live_rows),
        "add_norm": lambda rows, live_rows: cpu_dense_dot.dense_add_norm(
            x[:rows], w, residual[:rows], norm_weight, 1e-5, live_rows),
        "qkv_rope": lambda rows, live_rows: cpu_dense_dot.dense_qkv_rope(
            x[:rows], w, cos[:rows], sin[:rows], kv_heads, q_per_kv, live_rows),
    }
    rows = min(live, m)
    for name, call in calls.items():
        got = jax.tree.leaves(jax.jit(call, static_argnums=0)(m, jnp.int32(live)))
        want = jax.tree.leaves(jax.jit(call, static_argnums=0)(rows, None)) if rows else [None] * len(got)
        for got_out, want_out in zip(got, want):
            got_out = np.asarray(got_out)
            assert not got_out[rows:].any(), name
            if rows:
                np.testing.assert_array_equal(got_out[:rows], np.asarray(want_out), err_msg=name)
    # The count is one value; the kernel refuses anything else rather than read past it.
    with pytest.raises(Exception, match="live-row count"):
        jax.ffi.ffi_call(cpu_dense_dot.TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32))(
            x, w, jnp.zeros((0,), jnp.int32)).block_until_ready()
