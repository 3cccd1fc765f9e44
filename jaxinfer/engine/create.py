"""Creating a ready engine: from a built engine directory (no compilation), or from a checkpoint
(weights placed on the mesh, KV pool planned and allocated, every bucket compiled in-process)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from jaxinfer.cache.kv_pool import plan_kv_memory
from jaxinfer.checkpoint import Checkpoint, load_checkpoint
from jaxinfer.configs import load_config
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.llm_engine import LLMEngine
from jaxinfer.errors import EngineError
from jaxinfer.model.panel_weight import pack_panel_weights, uses_panel_weights
from jaxinfer.model.sharding import make_mesh, pad_heads, place_params
from jaxinfer.quant.apply import calibrate, pack_for_cpu_kernel, quantize_params, uses_cpu_kernel
from jaxinfer.quant.apply import describe as describe_quantization
from jaxinfer.runner.model_runner import ModelRunner, allocate_kv_caches, compile_steps

ENGINE_MANIFEST = "manifest.json"


def is_engine_dir(path: str | Path | None) -> bool:
    """Whether `path` holds an engine (of any format version): its manifest.json is a JSON object
    with the engine format's `format_version` key. Other tools write manifest.json files too (a web
    app's), and `jaxinfer build` replaces engine directories."""
    if path is None:
        return False
    try:
        manifest = json.loads((Path(path) / ENGINE_MANIFEST).read_text())
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return False
    return isinstance(manifest, dict) and "format_version" in manifest


def given_flags(**options) -> list[str]:
    """The command-line flags (`--max-num-seqs`) of the options set, those not None."""
    return [f"--{name.replace('_', '-')}" for name, value in options.items() if value is not None]


def refuse_build_options(model: str | Path | None, **options) -> None:
    """Raises an EngineError naming the build options set (not None) when `model` is a built
    engine: its dtype, mesh, quantization, buckets and KV pool were fixed when it was compiled."""
    given = given_flags(**options)
    if given and is_engine_dir(model):
        raise EngineError(f"{model} is a built engine, whose {', '.join(given)} {'was' if len(given) == 1 else 'were'} "
                          f"fixed at build: drop {'it' if len(given) == 1 else 'them'}, or build an engine with "
                          f"`jaxinfer build {' '.join(given)} ... --output DIR` and pass that")


def create_engine(model: str | Path | None = None, progress: bool = True, background: bool = False,
                  enable_prefix_caching: bool = True, **overrides) -> LLMEngine:
    """An engine for `model` (engine directory, HF directory, .gguf, or None for the default
    model); keyword overrides are EngineConfig fields (ignored for a built engine, whose build
    config is fixed). `background`: a built engine returns while its buckets' executables are
    still loading (jaxinfer.engine.artifact.load_engine). `enable_prefix_caching` is the
    scheduler's choice, not the build's: any engine serves with the prefix cache off as well."""
    if is_engine_dir(model):
        from jaxinfer.engine.artifact import load_engine

        return load_engine(Path(model), progress=progress, background=background,
                           enable_prefix_caching=enable_prefix_caching)
    checkpoint = load_checkpoint(model)
    return engine_from_checkpoint(checkpoint, EngineConfig.create(**overrides), progress, enable_prefix_caching)


def prepare_device_state(checkpoint: Checkpoint, engine_cfg: EngineConfig, progress: bool):
    """Places weights on the mesh and allocates the planned KV pool; returns
    (model config as served, engine config, mesh, params, kv caches)."""
    cfg = checkpoint.config
    if engine_cfg.max_model_len > cfg.max_position_embeddings:
        # The configured default is lowered for every model shorter than it; a value the user chose is said.
        if engine_cfg.max_model_len != load_config("engine")["max_model_len"]:
            print(f"max_model_len {engine_cfg.max_model_len} lowered to {cfg.max_position_embeddings}, the model's "
                  "max_position_embeddings", file=sys.stderr)
        engine_cfg = dataclasses.replace(engine_cfg, max_model_len=cfg.max_position_embeddings)
    mesh = make_mesh(engine_cfg.tp)
    params, cfg = serving_params(checkpoint, engine_cfg, mesh, progress)
    plan = plan_kv_memory(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, engine_cfg.kv_dtype,
                          engine_cfg.block_size, engine_cfg.kv_budget_bytes())
    if progress:
        print(plan.describe(), file=sys.stderr)
    kv_caches = allocate_kv_caches(cfg, engine_cfg, mesh, plan.num_blocks)
    return cfg, engine_cfg, mesh, params, kv_caches


def serving_params(checkpoint: Checkpoint, engine_cfg: EngineConfig, mesh, progress: bool = True):
    """The checkpoint's params as the engine serves them: heads padded for the mesh, linear
    weights quantized when `engine_cfg.quant` is set (packed for the CPU kernels where they run),
    cast and placed, bfloat16 matmul weights stored as AMX panels where the CPU kernel runs them
    (jaxinfer.model.panel_weight); returns (params, config)."""
    params, cfg = pad_heads(checkpoint.params, checkpoint.config, engine_cfg.tp)
    if engine_cfg.quant:
        params = quantize_params(params, cfg, engine_cfg.quant,
                                 calibrate(params, cfg, checkpoint.tokenizer, engine_cfg.quant))
    if uses_cpu_kernel(engine_cfg.quant, engine_cfg.tp):
        params = pack_for_cpu_kernel(params)
    if uses_panel_weights(engine_cfg.dtype, engine_cfg.quant, engine_cfg.tp):
        # Packed as numpy views of the checkpoint's arrays: placing them makes the one copy.
        params = pack_panel_weights(params)
    params, cfg = place_params(params, cfg, mesh, engine_cfg.dtype)
    if progress and engine_cfg.quant:
        print(describe_quantization(params, engine_cfg.quant, engine_cfg.dtype), file=sys.stderr)
    return params, cfg


def engine_from_checkpoint(checkpoint: Checkpoint, engine_cfg: EngineConfig, progress: bool = True,
                           enable_prefix_caching: bool = True) -> LLMEngine:
    cfg, engine_cfg, mesh, params, kv_caches = prepare_device_state(checkpoint, engine_cfg, progress)
    executables = compile_steps(cfg, engine_cfg, mesh, params, kv_caches, progress)
    runner = ModelRunner(cfg, engine_cfg, mesh, params, kv_caches, executables, checkpoint.tokenizer.eos_token_ids)
    return LLMEngine(runner, checkpoint.tokenizer, cfg, engine_cfg, enable_prefix_caching)
