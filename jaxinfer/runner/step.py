"""The compiled model step: one forward pass over a flat ragged batch, then sampling.

`model_step(params, kv_caches, inputs, sampling, cfg=, num_devices=)` is a pure function; the engine
compiles it ahead of time once per shape bucket (T tokens, S rows) with the KV caches donated, so the
pool is updated in place. `num_devices` (the mesh's) picks the attention implementation. Shapes:

    inputs.tokens          [T] int32     new tokens of all scheduled sequences, end to end, padded
    inputs.positions       [T] int32     their positions in their sequences
    inputs.attention       AttentionMetadata (slot mapping, block tables [S, B_max], lengths)
    inputs.logits_indices  [S] int32     flat index of the token whose logits each sampled row uses
                                         (a request fanning out to n samples has n rows on one index)
    inputs.block_copies    [S, 2] int32  (src, dst) block copies for copy-on-write, done before
                                         attention; padding rows copy the null block onto itself
    sampling               SamplingMetadata with [S] rows (jaxinfer.runner.sampling)

Returns the SamplerOutput (token ids, logprobs, top logprobs per row) and the updated caches.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from jaxinfer.cache.attention_metadata import AttentionMetadata
from jaxinfer.cache.kv_pool import write_kv
from jaxinfer.model.config import ModelConfig
from jaxinfer.model.llama import compute_logits, forward
from jaxinfer.runner.sampling import SamplingMetadata, sample
from pallas_kernels.ragged_paged_attention import ragged_paged_attention


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    tokens: jax.Array
    positions: jax.Array
    attention: AttentionMetadata
    logits_indices: jax.Array
    block_copies: jax.Array


def attention_implementation(num_devices: int) -> str | None:
    """The backend's attention (None) on one device; under GSPMD tensor parallelism the all-XLA path,
    since a custom call such as the CPU decode kernel is not partitioned (see `ragged_paged_attention`)."""
    return None if num_devices == 1 else "xla"


def paged_attend(q, k, v, cache, *, metadata: AttentionMetadata, sm_scale: float, implementation: str | None):
    cache = write_kv(cache, k, v, metadata.slot_mapping)
    return ragged_paged_attention(q, cache, metadata, sm_scale=sm_scale, implementation=implementation), cache


def copy_blocks(cache, block_copies: jax.Array):
    """Copies whole blocks src -> dst in order. A loop of dynamic slices keeps the donated pool
    updated in place; a gather + scatter over the pool made XLA copy all of it every step."""
    def copy_one(i, pool):
        block = jax.lax.dynamic_index_in_dim(pool, block_copies[i, 0], axis=0, keepdims=True)
        return jax.lax.dynamic_update_index_in_dim(pool, block, block_copies[i, 1], axis=0)

    return jax.tree.map(lambda pool: jax.lax.fori_loop(0, block_copies.shape[0], copy_one, pool), cache)


def model_step(params, kv_caches, inputs: StepInputs, sampling: SamplingMetadata, *, cfg: ModelConfig,
               num_devices: int):
    kv_caches = [copy_blocks(cache, inputs.block_copies) for cache in kv_caches]
    attend = functools.partial(paged_attend, metadata=inputs.attention, sm_scale=cfg.head_dim ** -0.5,
                               implementation=attention_implementation(num_devices))
    hidden, kv_caches = forward(params, cfg, inputs.tokens, inputs.positions, kv_caches, attend)
    logits = compute_logits(params, hidden[inputs.logits_indices])
    return sample(logits, sampling), kv_caches
