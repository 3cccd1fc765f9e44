"""ModelRunner: the device state of an engine (params, KV pool) and its compiled step per bucket.

`execute(scheduler_output)` picks the bucket, builds the padded inputs on the host, runs the
compiled step (the KV pool is donated and updated in place) and returns, per model step of the call
(`SchedulerOutput.num_steps`) and scheduled sequence, the tokens it sampled. Executables are either
compiled here (`compile_steps`) or loaded from an engine directory (jaxinfer.engine.artifact); the
runner does not care which, and never compiles while serving: a missing bucket is an error, not a
silent recompilation.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from collections.abc import Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from jaxinfer.cache.kv_pool import LayerKVCache, init_layer_cache
from jaxinfer.engine.config import EngineConfig
from jaxinfer.errors import EngineError
from jaxinfer.model.config import ModelConfig
from jaxinfer.model.sharding import logical_sharding
from jaxinfer.runner.batch import build_step_inputs
from jaxinfer.runner.buckets import Bucket
from jaxinfer.runner.sampling import build_sampling_metadata
from jaxinfer.runner.step import model_step
from jaxinfer.scheduler.scheduler import SchedulerOutput


@dataclasses.dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float
    top_ids: np.ndarray       # [MAX_LOGPROBS] int32
    top_logprobs: np.ndarray  # [MAX_LOGPROBS] float32


def kv_cache_shardings(mesh: Mesh, quantized: bool) -> LayerKVCache:
    values = logical_sharding(mesh, (None, None, "kv_heads", None))
    scales = logical_sharding(mesh, (None, None, "kv_heads")) if quantized else None
    return LayerKVCache(values, values, scales, scales)


def allocate_kv_caches(cfg: ModelConfig, engine_cfg: EngineConfig, mesh: Mesh, num_blocks: int) -> list[LayerKVCache]:
    """One zeroed pool per layer, created directly in its sharded layout."""
    quantized = engine_cfg.kv_dtype in ("int8", "fp8")
    init = jax.jit(functools.partial(init_layer_cache, num_blocks, engine_cfg.block_size, cfg.num_kv_heads,
                                     cfg.head_dim, engine_cfg.kv_dtype),
                   out_shardings=kv_cache_shardings(mesh, quantized))
    return [init() for _ in range(cfg.num_layers)]


class ModelRunner:
    def __init__(self, cfg: ModelConfig, engine_cfg: EngineConfig, mesh: Mesh, params, kv_caches,
                 executables: Mapping[Bucket, Callable], eos_token_ids: tuple[int, ...]):
        self.cfg, self.engine_cfg, self.mesh = cfg, engine_cfg, mesh
        self.params, self.kv_caches = params, kv_caches
        self.executables = executables
        self.eos_token_ids = eos_token_ids

    @property
    def num_blocks(self) -> int:
        return self.kv_caches[0].num_blocks

    def execute(self, out: SchedulerOutput, seed_of: Callable[[str], int]) -> list[list[list[SampledToken]]]:
        """Runs `out.num_steps` model steps in one call; returns per step the sampled tokens of each
        scheduled entry (aligned with `out.scheduled`, empty for mid-prompt chunks)."""
        chunks = out.scheduled
        ecfg = self.engine_cfg
        bucket = self.bucket_of(out)
        if bucket not in self.executables:
            raise EngineError(f"no compiled step for bucket {bucket.name}; the engine was built with other buckets")
        inputs, rows = build_step_inputs(chunks, out.block_copies, bucket, ecfg.block_size, ecfg.max_blocks_per_seq,
                                         out.num_steps)
        sampling = self._sampling_metadata(chunks, rows, bucket, seed_of)
        result, self.kv_caches = self.executables[bucket](self.params, self.kv_caches, inputs, sampling)
        result = jax.device_get(result)
        token_ids, logprobs = result.token_ids.tolist(), result.logprobs.tolist()
        steps = []
        for step in range(out.num_steps):
            sampled: list[list[SampledToken]] = [[] for _ in chunks]
            for row, (entry, _) in enumerate(rows):
                sampled[entry].append(SampledToken(token_ids[step][row], logprobs[step][row],
                                                   result.top_ids[step, row], result.top_logprobs[step, row]))
            steps.append(sampled)
        return steps

    def bucket_of(self, out: SchedulerOutput) -> Bucket:
        """The compiled bucket a call of `out` runs: its tokens, sequences and samples."""
        chunks = out.scheduled
        return self.engine_cfg.ladder.select(sum(c.num_new_tokens for c in chunks), len(chunks),
                                             sum(c.num_samples for c in chunks))

    def _sampling_metadata(self, chunks, rows, bucket: Bucket, seed_of: Callable[[str], int]):
        seqs = [chunks[entry].seq for entry, _ in rows]
        # Only rows with penalties read their token ids; copying every row's prompt and output each
        # step cost O(context) per sequence (a range stands for an output of that length).
        needs_history = [seq.sampling_params.uses_penalties for seq in seqs]
        return build_sampling_metadata(
            [seq.sampling_params for seq in seqs],
            [seq.prompt_token_ids if full else () for seq, full in zip(seqs, needs_history)],
            [seq.output_token_ids if full else range(seq.num_output_tokens) for seq, full in zip(seqs, needs_history)],
            [seed_of(seq.request_id) for seq in seqs],
            # At a fan-out (the parent's first sample) sample j becomes child j.
            [seq.seq_index + sample for (_, sample), seq in zip(rows, seqs)],
            num_seqs_bucket=bucket.num_seqs, vocab_size=self.cfg.vocab_size,
            history_len=self.engine_cfg.max_model_len, eos_token_ids=self.eos_token_ids)


def step_function(cfg: ModelConfig, mesh: Mesh, kv_caches, decode_steps: int):
    """The jitted step with its shardings fixed: inputs and outputs replicated, the KV pool donated
    and kept in its sharded layout."""
    replicated = NamedSharding(mesh, PartitionSpec())
    cache_shardings = [jax.tree.map(lambda a: a.sharding, cache) for cache in kv_caches]
    return jax.jit(functools.partial(model_step, cfg=cfg, num_devices=mesh.size, decode_steps=decode_steps),
                   donate_argnums=(1,),
                   out_shardings=(replicated, cache_shardings))


def abstract_step_inputs(cfg: ModelConfig, ecfg: EngineConfig, bucket: Bucket, mesh: Mesh):
    """ShapeDtypeStructs of a bucket's step inputs and sampling metadata (replicated)."""
    inputs, _ = build_step_inputs((), (), bucket, ecfg.block_size, ecfg.max_blocks_per_seq)
    sampling = build_sampling_metadata([], [], [], [], [], num_seqs_bucket=bucket.num_seqs,
                                       vocab_size=cfg.vocab_size, history_len=ecfg.max_model_len)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), (inputs, sampling))


def compile_steps(cfg: ModelConfig, engine_cfg: EngineConfig, mesh: Mesh, params, kv_caches,
                  progress: bool = True) -> dict[Bucket, jax.stages.Compiled]:
    """Lowers the step for every bucket of the engine's ladder, then compiles the buckets in
    parallel threads (XLA compiles without the GIL: 1.4x faster on 2 cores, more on more)."""
    step = step_function(cfg, mesh, kv_caches, engine_cfg.decode_steps)
    lowered = {bucket: step.lower(params, kv_caches, *abstract_step_inputs(cfg, engine_cfg, bucket, mesh))
               for bucket in engine_cfg.ladder.all_buckets}
    compiled = {}
    with concurrent.futures.ThreadPoolExecutor(min(len(lowered), os.cpu_count() or 1)) as pool:
        futures = {pool.submit(lowering.compile): bucket for bucket, lowering in lowered.items()}
        done = concurrent.futures.as_completed(futures)
        for future in tqdm(done, total=len(futures), desc="compiling buckets", unit="bucket", disable=not progress):
            compiled[futures[future]] = future.result()
    return dict(sorted(compiled.items()))
