"""The paged KV pool: cache writes against a numpy scatter, quantization error bounds, donation, memory plans."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxinfer.cache.kv_pool import (LayerKVCache, as_stored, dequantize_kv, device_kv_budget, init_layer_cache,
                                    plan_kv_memory, quantize_kv, write_kv)
from jaxinfer.errors import EngineError

NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 6, 8, 3, 16


def random_rows(rng: np.random.Generator, num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """k, v [T, kvh, hd] float32 of different magnitudes."""
    shape = (num_tokens, KV_HEADS, HEAD_DIM)
    return rng.standard_normal(shape).astype(np.float32) * 3, rng.standard_normal(shape).astype(np.float32)


def random_write(seed: int, num_tokens: int):
    """k, v [T, kvh, hd] float32 and distinct random slots outside the null block."""
    rng = np.random.default_rng(seed)
    slots = rng.choice(np.arange(BLOCK_SIZE, NUM_BLOCKS * BLOCK_SIZE), num_tokens, replace=False).astype(np.int32)
    return *random_rows(rng, num_tokens), slots


def filled_cache(seed: int, kv_dtype: str) -> LayerKVCache:
    """A pool whose every row already holds random data, so untouched rows can be checked."""
    k, v = random_rows(np.random.default_rng(seed), NUM_BLOCKS * BLOCK_SIZE)
    return write_kv(init_layer_cache(NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM, kv_dtype), jnp.asarray(k),
                    jnp.asarray(v), jnp.arange(NUM_BLOCKS * BLOCK_SIZE, dtype=jnp.int32))


@pytest.mark.parametrize("kv_dtype,dtype", [("float32", jnp.float32), ("bfloat16", jnp.bfloat16)])
def test_write_matches_numpy_scatter(kv_dtype, dtype):
    before = filled_cache(0, kv_dtype)
    k, v, slots = random_write(1, 11)
    after = write_kv(before, jnp.asarray(k), jnp.asarray(v), jnp.asarray(slots))
    assert after.k_scale is None and after.v_scale is None
    for pool_before, pool_after, rows in ((before.k, after.k, k), (before.v, after.v, v)):
        expected = np.asarray(pool_before).reshape(-1, KV_HEADS, HEAD_DIM).copy()
        expected[slots] = rows.astype(dtype)
        assert pool_after.dtype == dtype and pool_after.shape == (NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
        np.testing.assert_array_equal(np.asarray(pool_after).reshape(expected.shape), expected)


@pytest.mark.parametrize("kv_dtype,numpy_dtype,limit", [("int8", np.int8, 127.0),
                                                        ("fp8", ml_dtypes.float8_e4m3fn, 448.0)])
def test_quantized_write_matches_numpy_absmax_quantizer(kv_dtype, numpy_dtype, limit):
    before = filled_cache(2, kv_dtype)
    k, v, slots = random_write(3, 9)
    after = write_kv(before, jnp.asarray(k), jnp.asarray(v), jnp.asarray(slots))
    for values_before, scales_before, values_after, scales_after, rows in (
            (before.k, before.k_scale, after.k, after.k_scale, k),
            (before.v, before.v_scale, after.v, after.v_scale, v)):
        scale = np.abs(rows).max(axis=-1) / limit
        scaled = rows / scale[..., None]
        expected_values = np.asarray(values_before).reshape(-1, KV_HEADS, HEAD_DIM).copy()
        expected_values[slots] = np.round(scaled).astype(numpy_dtype) if numpy_dtype is np.int8 \
            else scaled.astype(numpy_dtype)
        expected_scales = np.asarray(scales_before).reshape(-1, KV_HEADS).copy()
        expected_scales[slots] = scale
        np.testing.assert_array_equal(np.asarray(values_after).reshape(expected_values.shape).astype(np.float32),
                                      expected_values.astype(np.float32))
        np.testing.assert_allclose(np.asarray(scales_after).reshape(expected_scales.shape), expected_scales, rtol=1e-6)


@pytest.mark.parametrize("kv_dtype,relative,steps", [("int8", 0.0, 0.5), ("fp8", 2.0 ** -4, 2.0 ** -10)])
def test_dequantized_rows_stay_within_half_a_quantization_step(kv_dtype, relative, steps):
    """int8: half a step of absmax / 127. fp8 e4m3: 3 mantissa bits (half a step is 2^-4 relative), and
    subnormals spaced 2^-9 apart in scaled units."""
    rows = np.random.default_rng(4).standard_normal((40, KV_HEADS, HEAD_DIM)).astype(np.float32)
    rows[0, 0] = 0.0
    values, scales = quantize_kv(jnp.asarray(rows), init_layer_cache(2, 1, 1, 1, kv_dtype).k.dtype)
    restored = np.asarray(dequantize_kv(values, scales))
    bound = relative * np.abs(rows) + steps * np.asarray(scales)[..., None]
    assert np.all(np.abs(restored - rows) <= bound * (1 + 1e-6))
    np.testing.assert_array_equal(restored[0, 0], 0.0)


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16", "int8", "fp8"])
def test_as_stored_is_what_attention_reads_back_from_the_pool(kv_dtype):
    """The rows a pool returns (write_kv, then the values dequantized with their scales, as the
    attention kernels read them) against as_stored on the same rows."""
    k, v, slots = random_write(7, 12)
    pool = write_kv(init_layer_cache(NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM, kv_dtype), jnp.asarray(k),
                    jnp.asarray(v), jnp.asarray(slots))
    blocks, offsets = slots // BLOCK_SIZE, slots % BLOCK_SIZE
    for values, scales, rows in ((pool.k, pool.k_scale, k), (pool.v, pool.v_scale, v)):
        read = dequantize_kv(values[blocks, offsets], None if scales is None else scales[blocks, offsets])
        stored = as_stored(jnp.asarray(rows), kv_dtype)
        assert stored.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(stored), np.asarray(read))
        if kv_dtype != "float32":
            assert not np.array_equal(np.asarray(stored), rows)


def test_donated_write_updates_the_pool_in_place():
    cache = filled_cache(5, "int8")
    pointers = [array.unsafe_buffer_pointer() for array in jax.tree.leaves(cache)]
    k, v, slots = random_write(6, 4)
    step = jax.jit(write_kv, donate_argnums=0)
    updated = step(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(slots))
    assert all(array.is_deleted() for array in jax.tree.leaves(cache))
    assert [array.unsafe_buffer_pointer() for array in jax.tree.leaves(updated)] == pointers


def test_init_and_write_reject_bad_arguments():
    with pytest.raises(EngineError, match="unknown KV cache dtype 'int4'.*float32, bfloat16, int8, fp8"):
        init_layer_cache(4, 16, 3, 64, "int4")
    with pytest.raises(EngineError, match="at least 2 blocks"):
        init_layer_cache(1, 16, 3, 64, "float32")
    cache = init_layer_cache(4, 16, 3, 64, "float32")
    assert (cache.num_blocks, cache.block_size, cache.num_kv_heads, cache.head_dim) == (4, 16, 3, 64)
    with pytest.raises(ValueError, match=r"\[T, num_kv_heads, head_dim\]"):
        write_kv(cache, jnp.zeros((2, 3, 32)), jnp.zeros((2, 3, 32)), jnp.zeros(2, jnp.int32))


@pytest.mark.parametrize("kv_dtype,value_bytes,scale_bytes", [("float32", 4, 0), ("bfloat16", 2, 0), ("int8", 1, 4),
                                                              ("fp8", 1, 4)])
def test_memory_plan_arithmetic(kv_dtype, value_bytes, scale_bytes):
    layers, kv_heads, head_dim, block_size, budget = 30, 3, 64, 16, 123_456_789
    plan = plan_kv_memory(layers, kv_heads, head_dim, kv_dtype, block_size, budget)
    per_token = 2 * layers * kv_heads * (head_dim * value_bytes + scale_bytes)
    assert plan.bytes_per_token == per_token
    assert plan.num_blocks == budget // (per_token * block_size)
    assert plan.pool_bytes <= budget < plan.pool_bytes + per_token * block_size
    assert plan.max_concurrent_tokens == (plan.num_blocks - 1) * block_size
    text = plan.describe()
    for number in (f"{per_token:,} B", f"{plan.num_blocks:,} blocks", f"{plan.max_concurrent_tokens:,} max concurrent",
                   f"2 x {layers} layers x {kv_heads} kv_heads x {head_dim} head_dim x {value_bytes} B"):
        assert number in text


def test_memory_plan_rejects_a_budget_below_two_blocks():
    with pytest.raises(EngineError, match="at least 2 are needed"):
        plan_kv_memory(30, 3, 64, "float32", 16, 2 * 46_080 * 16 - 1)


class _FakeGpu:
    platform = "gpu"

    def memory_stats(self):
        return {"bytes_limit": 80_000, "bytes_in_use": 30_000}


def test_device_budget_from_a_memory_fraction():
    assert device_kv_budget(0.5, _FakeGpu()) == 10_000
    with pytest.raises(EngineError, match="leaves nothing"):
        device_kv_budget(0.25, _FakeGpu())
    with pytest.raises(EngineError, match=r"in \(0, 1\]"):
        device_kv_budget(1.5, _FakeGpu())


def test_device_budget_on_cpu_asks_for_bytes():
    if jax.local_devices()[0].memory_stats():
        pytest.skip("this backend reports its memory")
    with pytest.raises(EngineError, match="give the KV cache budget in bytes"):
        device_kv_budget(0.9)


def test_block_copies_run_in_order_in_every_layer_and_padding_rows_copy_nothing(rng):
    from jaxinfer.runner.step import copy_blocks

    shape = (NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    pools = [LayerKVCache(*(rng.standard_normal(shape).astype(np.float32) for _ in range(2)), None, None)
             for _ in range(2)]
    # 2 -> 4, then 4 -> 5 (sees the first copy), then padding rows: the null block onto itself
    copies = np.array([[2, 4], [4, 5], [0, 0], [0, 0]], np.int32)
    got = jax.jit(copy_blocks, donate_argnums=0)(jax.tree.map(jnp.asarray, pools), jnp.asarray(copies))
    for before, after in zip(pools, got):
        for old, new in ((before.k, after.k), (before.v, after.v)):
            want = old.copy()
            want[4] = old[2]
            want[5] = old[2]
            np.testing.assert_array_equal(np.asarray(new), want)
