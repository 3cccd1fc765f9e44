"""`jaxinfer serve [ENGINE_DIR]`: the gRPC server (serving/server.py) over one engine.

ENGINE_DIR may also be an HF checkpoint directory or a .gguf file (compiled at start). Without
it, the default model's engine is built once into the user cache directory and served from there
(built again where another jaxinfer, jax or device made it).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from jaxinfer.engine.artifact import read_manifest
from jaxinfer.engine.build import build_engine, turn_off_persistent_cache
from jaxinfer.engine.create import create_engine
from jaxinfer.errors import EngineError
from serving.server import ServerConfig, run_server


def default_engine_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "jaxinfer" / "engines" / "default"


def ensure_default_engine(engine_dir: Path) -> None:
    """Builds the default model's engine into `engine_dir` (the user cache, ours to manage) when it
    is missing, unfinished, or was built by another jaxinfer, jax or device."""
    try:
        read_manifest(engine_dir)
        return
    except EngineError as err:
        reason = err
    print(f"jaxinfer: building the default model's engine into {engine_dir} ({reason})", file=sys.stderr, flush=True)
    shutil.rmtree(engine_dir, ignore_errors=True)
    turn_off_persistent_cache()
    build_engine(None, engine_dir)


def _load_engine(engine_dir: str | None):
    if engine_dir is None:
        engine_dir = default_engine_dir()
        ensure_default_engine(engine_dir)
    # The server takes requests while the buckets finish loading.
    return create_engine(engine_dir, background=True)


def main(args) -> int:
    config = ServerConfig(host=args.host, port=args.port, metrics_port=args.metrics_port,
                          model_name=args.served_model_name or "", tls_cert=args.tls_cert, tls_key=args.tls_key,
                          auth_token_file=args.auth_token_file, max_queued_requests=args.max_queued_requests,
                          drain_timeout_s=args.drain_timeout)
    return run_server(lambda: _load_engine(args.engine_dir), config)
