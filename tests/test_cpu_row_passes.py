"""The quantized CPU kernels' fused calls (pallas_kernels/cpu_row_passes.{h,py}; W4A8 in
cpu_int4_dot, W8A8 in cpu_int8_dot): the residual add and RMSNorm, the qkv split and RoPE, and the
SwiGLU taken in the matmul's call against the model's float32 ops on the kernel's own product, the
step's routing to them, and their refusals. The dense kernel's bfloat16 passes:
tests/test_cpu_dense_dot.py."""

from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.model import llama
from jaxinfer.model.layers import apply_rope, residual_rms_norm, rms_norm, swiglu
from jaxinfer.quant import quantize_weight
from jaxinfer.quant.apply import pack_for_cpu_kernel
from jaxinfer.runner.step import LiveRowsQuantizedWeight
from pallas_kernels import cpu_int4_dot, cpu_int8_dot


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One quantized kernel's calls on a packed weight: `dot` is its plain product, the others its
    fused calls, each taking the weight's arrays by keyword (`arrays`)."""
    mode: str
    module: object
    dot: object
    add_norm: object
    qkv_rope: object
    swiglu: object
    arrays: object

    def weight(self, rng, k: int, n: int):
        w = quantize_weight(rng.standard_normal((k, n)).astype(np.float32), self.mode)
        return pack_for_cpu_kernel({"layers": [{"wo": w}]})["layers"][0]["wo"]

    def bound(self, call, w):
        return functools.partial(call, **self.arrays(w))


KERNELS = {
    "w4a8": Kernel("w4a8", cpu_int4_dot, cpu_int4_dot.w4a8_dot, cpu_int4_dot.w4a8_add_norm, cpu_int4_dot.w4a8_qkv_rope,
                   cpu_int4_dot.w4a8_swiglu, lambda w: dict(codes=w.packed, scale=w.scale, offset=w.offset)),
    "w8a8": Kernel("w8a8", cpu_int8_dot, cpu_int8_dot.w8a8_dot, cpu_int8_dot.w8a8_add_norm, cpu_int8_dot.w8a8_qkv_rope,
                   cpu_int8_dot.w8a8_swiglu, lambda w: dict(w_packed=w.q, w_scale=w.scale)),
}


@pytest.fixture(params=list(KERNELS))
def kernel(request) -> Kernel:
    chosen = KERNELS[request.param]
    if not chosen.module.available():
        pytest.skip("needs an x86-64 CPU with AVX2 and a C++ compiler")
    return chosen


@pytest.mark.parametrize("m, live", [(1, 1), (5, 4), (24, 21)])
def test_fused_calls_match_the_layer_ops_after_the_kernels_product(rng, kernel, m, live):
    """The passes give what the model's float32 ops give on the kernel's own product, and zeros past
    the live rows."""
    x = jnp.asarray(rng.standard_normal((m, 576)) * rng.uniform(0.1, 4, 576), jnp.float32)
    live_rows = jnp.int32(live)

    def product(w) -> jax.Array:
        return kernel.bound(kernel.dot, w)(x)[:live]

    wo = kernel.weight(rng, 576, 576)
    residual = jnp.asarray(rng.standard_normal((m, 576)) * 30, jnp.float32)
    norm_weight = jnp.asarray(rng.uniform(0.2, 2, 576), jnp.float32)
    add_norm = jax.jit(kernel.bound(kernel.add_norm, wo), static_argnames="eps")
    total, normed = add_norm(x, residual=residual, norm_weight=norm_weight, eps=1e-5, live_rows=live_rows)
    want_total = residual[:live] + product(wo)
    np.testing.assert_array_equal(np.asarray(total[:live]), np.asarray(want_total))
    np.testing.assert_allclose(np.asarray(normed[:live]), np.asarray(rms_norm(want_total, norm_weight, 1e-5)),
                               rtol=1e-5, atol=1e-6)

    kv_heads, q_per_kv, head_dim = 3, 3, 64
    w_qkv = kernel.weight(rng, 576, kv_heads * (q_per_kv + 2) * head_dim)
    angles = rng.uniform(0, 100, (m, head_dim // 2)).astype(np.float32)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    qkv_rope = jax.jit(kernel.bound(kernel.qkv_rope, w_qkv), static_argnames=("kv_heads", "q_per_kv"))
    q, k, v = qkv_rope(x, cos=cos, sin=sin, kv_heads=kv_heads, q_per_kv=q_per_kv, live_rows=live_rows)
    groups = product(w_qkv).reshape(live, kv_heads, q_per_kv + 2, head_dim)
    want_q = apply_rope(groups[:, :, :q_per_kv].reshape(live, -1, head_dim), cos[:live], sin[:live])
    want_k = apply_rope(groups[:, :, q_per_kv], cos[:live], sin[:live])
    for got, want in ((q, want_q), (k, want_k), (v, groups[:, :, q_per_kv + 1])):
        np.testing.assert_allclose(np.asarray(got[:live]), np.asarray(want).reshape(live, -1), rtol=1e-5,
                                   atol=1e-5 * float(jnp.abs(want).max()))

    w_gate_up = kernel.weight(rng, 576, 2 * 1536)
    act = jax.jit(kernel.bound(kernel.swiglu, w_gate_up))(x, live_rows=live_rows)
    gate_up = product(w_gate_up).reshape(live, 1536, 2)
    want_act = gate_up[..., 0] / (1 + jnp.exp(-gate_up[..., 0])) * gate_up[..., 1]
    np.testing.assert_allclose(np.asarray(act[:live]), np.asarray(want_act), rtol=1e-5,
                               atol=1e-6 * float(jnp.abs(want_act).max()))
    for padding in (total, normed, q, k, v, act):
        assert not np.asarray(padding[live:]).any()


def layer_ops_text(weights, x_dtype, rows: int = 4) -> str:
    """The lowered text of a layer's qkv + RoPE, residual add + norm and SwiGLU on these weights."""
    kv_heads, q_per_kv, head_dim = 2, 2, 32
    cfg = SimpleNamespace(num_kv_heads=kv_heads, q_per_kv=q_per_kv, head_dim=head_dim, num_heads=kv_heads * q_per_kv)
    cos = sin = jnp.ones((rows, head_dim // 2), jnp.float32)
    norm_weight = jnp.ones((64,), jnp.float32)

    def layer_ops(x, residual):
        return (llama._project_qkv_rope(x, weights, cfg, cos, sin),
                residual_rms_norm(residual, x, weights["wo"], norm_weight, 1e-5), swiglu(x, weights["w_gate_up"]))

    return jax.jit(layer_ops).lower(jnp.ones((rows, 64), x_dtype), jnp.ones((rows, 64), jnp.float32)).as_text()


def test_engine_steps_take_the_fused_calls_for_float32_activations(rng, kernel):
    """In a step (LiveRowsQuantizedWeight) a packed weight takes the model's residual add and norm,
    qkv split and RoPE, and SwiGLU into its kernel's call for float32 activations; bfloat16
    activations, the weight outside a step, and W8A8 steps beyond the rows its kernel serves keep the
    unfused ops."""
    layer = {"w_qkv": kernel.weight(rng, 64, 2 * 4 * 32), "wo": kernel.weight(rng, 64, 64),
             "w_gate_up": kernel.weight(rng, 64, 2 * 96)}
    routed = {name: LiveRowsQuantizedWeight(w, jnp.int32(3)) for name, w in layer.items()}
    fused_targets = [target for target in kernel.module.KERNEL.targets
                     if target.endswith(("_add_norm", "_qkv_rope", "_swiglu"))]
    assert len(fused_targets) == 3
    assert all(target in layer_ops_text(routed, jnp.float32) for target in fused_targets)
    unfused = [layer_ops_text(routed, jnp.bfloat16), layer_ops_text(layer, jnp.float32)]
    if kernel.mode == "w8a8":
        unfused.append(layer_ops_text(routed, jnp.float32, rows=cpu_int8_dot.max_rows() + 1))
    for text in unfused:
        assert not any(target in text for target in fused_targets)


def test_fused_calls_refuse_operands_they_do_not_take(rng, kernel):
    w = kernel.weight(rng, 64, 96)
    x = jnp.ones((2, 64), jnp.float32)
    for residual, norm_weight in (((2, 48), (96,)), ((2, 48), (48,))):
        with pytest.raises(ValueError, match="residual .* N = 96 outputs"):
            kernel.bound(kernel.add_norm, w)(x, residual=jnp.ones(residual, jnp.float32),
                                             norm_weight=jnp.ones(norm_weight), eps=1e-5)
    with pytest.raises(ValueError, match="96 outputs for 2 kv heads of 2 query heads"):
        kernel.bound(kernel.qkv_rope, w)(x, cos=jnp.ones((2, 16)), sin=jnp.ones((2, 16)), kv_heads=2, q_per_kv=2)
    with pytest.raises(ValueError, match="F a multiple of 16; got 80"):
        kernel.bound(kernel.swiglu, kernel.weight(rng, 64, 80))(x)
