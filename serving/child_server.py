"""A server in a child process, for tests and the load script: start it over a checkpoint with
engine overrides, learn its ports from its stderr, wait until the health service says SERVING,
stop it with SIGTERM.

    with ChildServer({"model": "tests/checkpoints/tiny-llama3", "max_num_seqs": 8, ...},
                     {"metrics_port": 0}) as server:  # or .launch() ... .wait_serving() ... .stop()
        channel = grpc.insecure_channel(server.address)

The child runs `python -m serving.child_server ENGINE_JSON CONFIG_JSON` (create_engine kwargs,
ServerConfig fields), so it imports nothing of the parent's test process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"gRPC listening on (\S+):(\d+)")
_METRICS = re.compile(r"metrics on (http://\S+/metrics)")


class ChildServer:
    def __init__(self, engine_kwargs: dict, config: dict | None = None, start_timeout_s: float = 300.0,
                 channel_credentials: grpc.ChannelCredentials | None = None):
        self.engine_kwargs = {"progress": False, **engine_kwargs}
        self.config = {"port": 0, **(config or {})}
        self.start_timeout_s = start_timeout_s
        self.channel_credentials = channel_credentials
        self.stderr_lines: list[str] = []
        self.address: str | None = None
        self.metrics_url: str | None = None
        self.process: subprocess.Popen | None = None

    def channel(self) -> grpc.Channel:
        if self.channel_credentials is None:
            return grpc.insecure_channel(self.address)
        # Test certificates are issued for "localhost".
        return grpc.secure_channel(self.address, self.channel_credentials,
                                   options=[("grpc.ssl_target_name_override", "localhost")])

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self.stderr_lines.append(line)
            if (match := _LISTENING.search(line)) is not None:
                self.address = f"{match.group(1)}:{match.group(2)}"
            if (match := _METRICS.search(line)) is not None:
                self.metrics_url = match.group(1)

    def launch(self) -> ChildServer:
        """Starts the child without waiting (overlap its engine build with other work)."""
        env = dict(os.environ)
        env.pop("XLA_FLAGS", None)  # the test session's 8 fake devices only slow a tp=1 server
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serving.child_server", json.dumps(self.engine_kwargs), json.dumps(self.config)],
            cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read_stderr, daemon=True).start()
        return self

    def wait_serving(self) -> ChildServer:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log}")
            if self.address is not None and self.health() == health_pb2.HealthCheckResponse.SERVING:
                return self
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"the server was not SERVING within {self.start_timeout_s} s:\n{self.log}")

    def start(self) -> ChildServer:
        return self.launch().wait_serving()

    @property
    def log(self) -> str:
        return "".join(self.stderr_lines)

    def health(self, service: str = "") -> int:
        with self.channel() as channel:
            try:
                return health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=2).status
            except grpc.RpcError:
                return health_pb2.HealthCheckResponse.UNKNOWN

    def terminate(self) -> None:
        """Sends SIGTERM (the server drains and exits)."""
        self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> ChildServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _main(engine_json: str, config_json: str) -> int:
    from jaxinfer.engine.create import create_engine
    from serving.server import ServerConfig, run_server

    engine_kwargs = json.loads(engine_json)
    return run_server(lambda: create_engine(**engine_kwargs), ServerConfig(**json.loads(config_json)))


if __name__ == "__main__":
    sys.exit(_main(*sys.argv[1:]))
