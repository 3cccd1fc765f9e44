"""The compiled model step updates the donated KV pool in place: its temp memory must not grow with
the pool. (A regression: XLA fused the write_kv update into the attention's block gather and then
copied the whole V pool every step, so decode time grew with the pool size.)"""

from __future__ import annotations

import jax
import pytest

from jaxinfer.checkpoint import load_checkpoint
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.create import prepare_device_state
from jaxinfer.runner.buckets import Bucket
from jaxinfer.runner.model_runner import abstract_step_inputs, step_function
from conftest import CHECKPOINTS_DIR


def _step_temp_and_pool(checkpoint, kv_memory: str, kv_dtype: str, bucket: Bucket, max_model_len: int):
    engine_cfg = EngineConfig.create(dtype="float32", kv_dtype=kv_dtype, max_num_seqs=4, max_num_batched_tokens=16,
                                     max_model_len=max_model_len, kv_memory=kv_memory)
    cfg, engine_cfg, mesh, params, kv_caches = prepare_device_state(checkpoint, engine_cfg, False)
    inputs, sampling = abstract_step_inputs(cfg, engine_cfg, bucket, mesh)
    compiled = step_function(cfg, mesh, kv_caches, engine_cfg.decode_steps).lower(params, kv_caches, inputs, sampling).compile()
    pool_bytes = sum(x.nbytes for cache in kv_caches for x in jax.tree.leaves(cache))
    return compiled.memory_analysis().temp_size_in_bytes, pool_bytes


@pytest.mark.parametrize("kv_dtype,bucket,max_model_len", [
    ("float32", Bucket(1, 1), 128),   # decode, one KV chunk
    ("float32", Bucket(4, 4), 512),   # decode batch, several KV chunks
    ("int8", Bucket(16, 4), 512),     # prefill tiles, quantized pool with scales
])
def test_step_temp_memory_does_not_grow_with_the_pool(kv_dtype, bucket, max_model_len):
    checkpoint = load_checkpoint(CHECKPOINTS_DIR / "tiny-llama3")
    small_temp, small_pool = _step_temp_and_pool(checkpoint, "4MiB", kv_dtype, bucket, max_model_len)
    large_temp, large_pool = _step_temp_and_pool(checkpoint, "32MiB", kv_dtype, bucket, max_model_len)
    assert large_pool >= 7 * small_pool
    # A copy of even one layer's K or V would add over 3 MiB here; the step's own buffers do not change.
    assert large_temp - small_temp < large_pool // 64, (small_temp, large_temp, large_pool)
