"""`jaxinfer build`: compile an engine for every bucket and write its directory."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import jax

from jaxinfer.checkpoint import load_checkpoint
from jaxinfer.engine.artifact import read_manifest, refuse_to_replace, save_engine
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.create import ENGINE_MANIFEST, engine_from_checkpoint, is_engine_dir
from jaxinfer.errors import EngineError


def build_engine(model: str | Path | None, output: str | Path, progress: bool = True, **overrides) -> Path:
    # An executable that jax's persistent compilation cache hands back serializes without some of its
    # functions (XLA:CPU, jax 0.12.1): the engine would fail when loaded ("Function
    # bitcast_gather_fusion not found"). A build compiles afresh or not at all.
    if jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir:
        raise EngineError(f"jax's persistent compilation cache is on ({jax.config.jax_compilation_cache_dir}): "
                          "executables it returns do not serialize whole, so this engine would fail to run. "
                          "Build with the cache off: unset JAX_COMPILATION_CACHE_DIR or set "
                          "jax_enable_compilation_cache to False before the first compilation.")
    output = Path(output)
    if is_engine_dir(model):
        source = json.loads((Path(model) / ENGINE_MANIFEST).read_text()).get("source")
        raise EngineError(f"{model} is a built engine already; build from the checkpoint it was built from "
                          f"(--model {source})")
    # The directory is replaced: refused now, before the compiling, if it holds anything but an engine.
    refuse_to_replace(output)
    start = time.perf_counter()
    checkpoint = load_checkpoint(model)
    engine = engine_from_checkpoint(checkpoint, EngineConfig.create(**overrides), progress)
    path = save_engine(output, engine, checkpoint.source)
    if progress:
        print(f"built engine {path} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return path


def default_engine_dir() -> Path:
    """Where `jaxinfer serve` keeps the default model's engine: the user cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "jaxinfer" / "engines" / "default"


def ensure_default_engine(engine_dir: Path) -> None:
    """Builds the default model's engine into `engine_dir` (the user cache, ours to manage) when it
    is missing, unfinished or malformed, of another engine format version, or built for another jax,
    backend, device or CPU: whenever read_manifest refuses it."""
    try:
        read_manifest(engine_dir)
        return
    except EngineError as err:
        reason = err
    print(f"jaxinfer: building the default model's engine into {engine_dir} ({reason})", file=sys.stderr, flush=True)
    shutil.rmtree(engine_dir, ignore_errors=True)
    turn_off_persistent_cache()
    build_engine(None, engine_dir)


def turn_off_persistent_cache() -> None:
    """For commands that build before anything compiles: jax decides at its first compilation
    whether the persistent cache is used, so turning it off later does not take effect."""
    jax.config.update("jax_enable_compilation_cache", False)


def main(args) -> None:
    turn_off_persistent_cache()
    build_engine(args.model, args.output, dtype=args.dtype, tp=args.tp, kv_dtype=args.kv_dtype,
                 max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                 max_model_len=args.max_model_len, block_size=args.block_size, kv_memory=args.kv_memory,
                 quant=args.quant, decode_steps=args.decode_steps,
                 buckets_per_doubling=args.buckets_per_doubling)
