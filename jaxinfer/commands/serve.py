"""`jaxinfer serve [ENGINE_DIR]`: the gRPC server (serving/server.py) over one engine.

ENGINE_DIR may also be an HF checkpoint directory or a .gguf file (compiled at start). Without
it, the default model's engine is built once into the user cache directory and served from there
(built again where another jaxinfer, jax or device made it).
"""

from __future__ import annotations

from jaxinfer.engine.build import default_engine_dir, ensure_default_engine
from jaxinfer.engine.create import create_engine


def _load_engine(engine_dir: str | None, enable_prefix_caching: bool = True):
    if engine_dir is None:
        engine_dir = default_engine_dir()
        ensure_default_engine(engine_dir)
    # The server takes requests while the buckets finish loading.
    return create_engine(engine_dir, background=True, enable_prefix_caching=enable_prefix_caching)


def main(args) -> int:
    # Imported here: serving.server's KServe protos cannot share a process with tritonclient's
    # (the tests'), and nothing else of this module needs them.
    from serving.server import ServerConfig, run_server

    config = ServerConfig(host=args.host, port=args.port, metrics_port=args.metrics_port,
                          model_name=args.served_model_name or "", tls_cert=args.tls_cert, tls_key=args.tls_key,
                          auth_token_file=args.auth_token_file, max_queued_requests=args.max_queued_requests,
                          drain_timeout_s=args.drain_timeout)
    return run_server(lambda: _load_engine(args.engine_dir, args.enable_prefix_caching), config)
