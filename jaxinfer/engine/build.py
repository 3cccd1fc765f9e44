"""`jaxinfer build`: compile an engine for every bucket and write its directory."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from jaxinfer.checkpoint import load_checkpoint
from jaxinfer.engine.artifact import save_engine
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.create import engine_from_checkpoint


def build_engine(model: str | Path | None, output: str | Path, progress: bool = True, **overrides) -> Path:
    start = time.perf_counter()
    checkpoint = load_checkpoint(model)
    engine = engine_from_checkpoint(checkpoint, EngineConfig.create(**overrides), progress)
    path = save_engine(Path(output), engine, checkpoint.source)
    if progress:
        print(f"built engine {path} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return path


def main(args) -> None:
    build_engine(args.model, args.output, dtype=args.dtype, tp=args.tp, kv_dtype=args.kv_dtype,
                 max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                 max_model_len=args.max_model_len, block_size=args.block_size, kv_memory=args.kv_memory,
                 quant=args.quant, decode_steps=args.decode_steps)
