"""The gRPC server process: jaxinfer.v1, KServe v2, grpc.health.v1 and reflection on one port,
Prometheus metrics on another, and the engine thread behind them.

Lifecycle: bind both ports and start (health NOT_SERVING) -> the engine thread loads the engine
-> SERVING -> on SIGTERM/SIGINT drain: NOT_SERVING, new requests UNAVAILABLE, in-flight requests
finish or are aborted after `drain_timeout_s` -> stop, exit code 0. If the engine fails while
serving: NOT_SERVING, every request ends with an error, stop, exit code 1 (for the supervisor to
restart it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
from collections.abc import Callable
from importlib import metadata

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from jaxinfer.engine.llm_engine import LLMEngine
from serving.engine_loop import EngineLoop
from serving.errors import ListenError
from serving.handlers import add_service
from serving.jaxinfer_service import JaxinferServicer
from serving.kserve_service import KServeServicer
from serving.metrics import ServerMetrics, serve_http
from serving.protos import jaxinfer_pb2, kserve_v2_pb2
from serving.security import BearerTokenInterceptor, read_token, server_credentials

log = logging.getLogger(__name__)

SERVICES = (jaxinfer_pb2.DESCRIPTOR.services_by_name["Jaxinfer"],
            kserve_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"])
# After the drain timeout: how long the aborted requests get to send their final (ABORT) message.
# The engine applies the aborts after its current step.
ABORT_WAIT_S = 5.0


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port (printed on stderr)
    metrics_port: int | None = None  # None: no metrics endpoint; 0 picks a free port
    model_name: str = ""  # "" uses the engine's model name
    tls_cert: str | None = None
    tls_key: str | None = None
    auth_token_file: str | None = None
    max_queued_requests: int = 256  # requests held by the server; more get RESOURCE_EXHAUSTED
    max_message_bytes: int = 4 * 2**20
    drain_timeout_s: float = 30.0

    @property
    def bare_host(self) -> str:
        """The host without the brackets an IPv6 address may be given in (what sockets take)."""
        return self.host[1:-1] if self.host.startswith("[") and self.host.endswith("]") else self.host

    def address(self, port: int) -> str:
        """host:port, an IPv6 host in brackets (what gRPC and URLs take)."""
        return f"[{self.bare_host}]:{port}" if ":" in self.bare_host else f"{self.bare_host}:{port}"


def _version() -> str:
    try:
        return metadata.version("jaxinfer")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class _Server:
    def __init__(self, engine_factory: Callable[[], LLMEngine], config: ServerConfig):
        if (config.tls_cert is None) != (config.tls_key is None):
            raise ValueError("give both --tls-cert and --tls-key, or neither")
        self.config = config
        self.metrics: ServerMetrics | None = None
        self.engine_loop = EngineLoop(engine_factory, config.max_queued_requests, self._observe)
        self.health = health.aio.HealthServicer()
        self.stopping = asyncio.Event()
        self.port: int | None = None  # the bound gRPC port, once bound

    def _observe(self, output, stream) -> None:
        if self.metrics is not None:
            self.metrics.observe(output, stream)

    async def _set_health(self, status) -> None:
        for name in ("", *(service.full_name for service in SERVICES)):
            await self.health.set(name, status)

    def _grpc_server(self, model_name: str) -> tuple[grpc.aio.Server, JaxinferServicer, KServeServicer]:
        config = self.config
        interceptors = [BearerTokenInterceptor(read_token(config.auth_token_file))] if config.auth_token_file else []
        server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # gRPC's default would let a second server bind this port too and silently share it.
            ("grpc.so_reuseport", 0)])
        jaxinfer_servicer = JaxinferServicer(self.engine_loop, model_name)
        kserve_servicer = KServeServicer(self.engine_loop, model_name, _version())
        add_service(server, SERVICES[0], jaxinfer_servicer)
        add_service(server, SERVICES[1], kserve_servicer)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [*(s.full_name for s in SERVICES), health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        address = config.address(config.port)
        try:
            if config.tls_cert:
                port = server.add_secure_port(address, server_credentials(config.tls_cert, config.tls_key))
            else:
                port = server.add_insecure_port(address)
        except RuntimeError:  # grpc says no more than "Failed to bind"
            tls = ", or --tls-cert/--tls-key are not a valid PEM certificate chain and key" if config.tls_cert else ""
            raise ListenError(f"cannot listen on {address}: the port is in use or the host is not an address "
                              f"of this machine{tls}; pick another --port or --host") from None
        self.port = port
        return server, jaxinfer_servicer, kserve_servicer

    def _metrics_http(self, registry: CollectorRegistry) -> int | None:
        """Serves `registry` on the metrics port (None without one); returns the bound port."""
        port = self.config.metrics_port
        if port is None:
            return None
        try:
            return serve_http(registry, self.config.bare_host, port)
        except OSError as err:
            raise ListenError(f"cannot serve metrics on {self.config.address(port)}: {err.strerror}; "
                              "pick another --metrics-port") from None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        server, jaxinfer_servicer, kserve_servicer = self._grpc_server(self.config.model_name)
        # Bound before the engine loads (minutes), so that a port in use fails at once; scrapes
        # find no samples until the metrics are registered.
        registry = CollectorRegistry()
        try:
            metrics_port = self._metrics_http(registry)
        except ListenError:
            await server.stop(grace=None)
            raise
        await server.start()
        print(f"jaxinfer: gRPC listening on {self.config.address(self.port)} "
              f"({'TLS' if self.config.tls_cert else 'plaintext'}), loading the engine", file=sys.stderr, flush=True)
        if metrics_port is not None:
            print(f"jaxinfer: metrics on http://{self.config.address(metrics_port)}/metrics", file=sys.stderr,
                  flush=True)
        engine_task = asyncio.create_task(self.engine_loop.start())
        stop_task = asyncio.create_task(self.stopping.wait())
        await asyncio.wait([engine_task, stop_task], return_when=asyncio.FIRST_COMPLETED)
        if not engine_task.done():
            engine_task.cancel()
            await server.stop(grace=None)
            return 0
        try:
            engine = engine_task.result()
        except Exception as err:
            print(f"jaxinfer: the engine failed to load: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            await server.stop(grace=None)
            return 1
        model_name = self.config.model_name or engine.model_cfg.name or "model"
        jaxinfer_servicer.model_name = kserve_servicer.model_name = model_name
        if metrics_port is not None:
            self.metrics = ServerMetrics(model_name, lambda: self.engine_loop.snapshot, registry)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        print(f"jaxinfer: serving {model_name!r}", file=sys.stderr, flush=True)
        failed_task = asyncio.create_task(self.engine_loop.failed.wait())
        await asyncio.wait([stop_task, failed_task], return_when=asyncio.FIRST_COMPLETED)
        if self.engine_loop.failure is not None:
            stop_task.cancel()
            await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            print(f"jaxinfer: the engine failed ({self.engine_loop.failure}); stopping", file=sys.stderr, flush=True)
            await server.stop(grace=1.0)  # the failed requests send their error statuses
            return 1
        failed_task.cancel()
        await self._drain(server)
        return 0

    async def _wait_idle(self, timeout_s: float) -> None:
        """Returns once no request is held, or after `timeout_s`."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.engine_loop.num_active and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)

    async def _drain(self, server: grpc.aio.Server) -> None:
        print("jaxinfer: draining", file=sys.stderr, flush=True)
        self.engine_loop.admitting = False
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._wait_idle(self.config.drain_timeout_s)
        if self.engine_loop.num_active:
            print(f"jaxinfer: aborting {self.engine_loop.num_active} requests still running after "
                  f"{self.config.drain_timeout_s} s", file=sys.stderr, flush=True)
            self.engine_loop.abort_all()
            # The aborts are applied after the engine's current step; stopping the server before
            # that would cut the streams off without their final ABORT message.
            await self._wait_idle(ABORT_WAIT_S)
        await server.stop(grace=1.0)
        self.engine_loop.stop()
        print("jaxinfer: stopped", file=sys.stderr, flush=True)


def run_server(engine_factory: Callable[[], LLMEngine], config: ServerConfig) -> int:
    """Serves until SIGTERM/SIGINT, then drains; returns the exit code (0 after a clean drain, 1
    when the engine failed to load or while serving). Raises ListenError when a port cannot be bound.
    The engine is built by `engine_factory` on the engine thread, after the port is open."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return asyncio.run(_Server(engine_factory, config).run())
