"""The server's lifecycle and its engine thread, over a stand-in engine (no model): an engine that
fails ends every request and command and takes the server down with health NOT_SERVING, tokenizing
leaves the event loop free, ports that cannot be bound are clear errors, KServe says UNAVAILABLE
while loading, requests whose client left reach the metrics, and a drain that aborts ends every
stream with its ABORT message.

The server's KServe protos and tritonclient's (tests/test_server.py) define the same protobuf
symbols, which cannot share a process: the tests that run a server run their scenario in one
spawned worker process, and only there is serving.server imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import multiprocessing
import socket
import struct
import threading
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxinfer.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jaxinfer.errors import RequestError
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.scheduler.block_manager import BlockManagerMetrics
from jaxinfer.scheduler.scheduler import SchedulerMetrics
from serving.engine_loop import EngineLoop
from serving.errors import EngineFailedError, ListenError
from serving.protos import jaxinfer_pb2 as pb
from serving.protos import jaxinfer_pb2_grpc

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class StandInTokenizer:
    """Characters as tokens; every call takes `delay_s`, asleep with the GIL released, so that a test
    sees whether the event loop waits for the tokenizer."""

    chat_template = "stand-in"
    delay_s = 0.0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        time.sleep(self.delay_s)
        return [ord(c) % 100 + 1 for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        time.sleep(self.delay_s)
        return "".join(chr(96 + i % 26) for i in ids)

    def apply_chat_template(self, messages) -> str:
        time.sleep(self.delay_s)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages)


class StandInEngine:
    """The LLMEngine calls the server makes: every request gets one token per step until
    max_tokens. `step_s` is each step's duration; `fail` makes the next step raise; `gate`, when
    set, holds each step until it is opened."""

    def __init__(self, step_s: float = 0.01):
        self.model_cfg = SimpleNamespace(name="stand-in", vocab_size=128)
        self.engine_cfg = SimpleNamespace(max_num_seqs=8)
        self.tokenizer = StandInTokenizer()
        self.step_s = step_s
        self.fail = False
        self.gate: threading.Event | None = None
        self.stepping = threading.Event()  # set while a step runs
        self.num_steps = 0
        self._requests: dict[str, tuple[SamplingParams, list[int], list[int], RequestMetrics]] = {}

    def add_request(self, request_id, params, prompt_token_ids, priority=0, arrival_time=None):
        if request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already running")
        self._requests[request_id] = (params, list(prompt_token_ids), [], RequestMetrics(arrival_time))

    def abort(self, request_id):
        if request_id not in self._requests:
            return None
        _, prompt, tokens, metrics = self._requests.pop(request_id)
        metrics.finished_time = time.monotonic()
        return RequestOutput(request_id, prompt, [CompletionOutput(0, "", list(tokens), finish_reason="abort")],
                             True, 0, metrics)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def metrics(self) -> SchedulerMetrics:
        return SchedulerMetrics(len(self._requests), 0, 0, BlockManagerMetrics(16, 64, 0, 64, 0, 0, 0, 0))

    def step(self) -> list[RequestOutput]:
        self.stepping.set()
        try:
            if self.gate is not None:
                self.gate.wait()
            time.sleep(self.step_s)
            if self.fail:
                raise RuntimeError("the stand-in device fell over")
            return [self._advance(request_id) for request_id in list(self._requests)]
        finally:
            self.num_steps += 1
            self.stepping.clear()

    def _advance(self, request_id: str) -> RequestOutput:
        params, prompt, tokens, metrics = self._requests[request_id]
        now = time.monotonic()
        token = len(tokens) % 26
        tokens.append(token)
        metrics.first_scheduled_time = metrics.first_scheduled_time or now
        metrics.first_token_time = metrics.first_token_time or now
        metrics.last_token_time = now
        finished = len(tokens) >= params.max_tokens
        if finished:
            metrics.finished_time = now
            del self._requests[request_id]
        text = "".join(chr(97 + t) for t in tokens)
        return RequestOutput(request_id, prompt, [CompletionOutput(
            0, text, list(tokens), None, "length" if finished else None, text[-1], [token])], finished, 0, metrics)


def _run_scenario(scenario, *args):
    outcome = scenario(*args)
    return asyncio.run(asyncio.wait_for(outcome, 60)) if asyncio.iscoroutine(outcome) else outcome


@pytest.fixture(scope="module")
def in_worker():
    """Runs a scenario (a module-level function, async or not) in the worker; returns its result
    or raises its exception, with the worker's traceback as the cause."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield lambda scenario, *args: pool.submit(_run_scenario, scenario, *args).result(timeout=120)


def kserve_protos():
    from serving.protos import kserve_v2_pb2, kserve_v2_pb2_grpc

    return kserve_v2_pb2, kserve_v2_pb2_grpc


def new_server(engine_factory, **config):
    from serving.server import ServerConfig, _Server

    return _Server(engine_factory, ServerConfig(**config))


@contextlib.asynccontextmanager
async def running_server(engine_factory, wait_serving: bool = True, **config):
    """A server on a free loopback port over `engine_factory`: yields (server, channel, run task);
    stops it on leaving unless the test already did."""
    server = new_server(engine_factory, **{"port": 0, **config})
    run = asyncio.create_task(server.run())
    while server.port is None:
        await asyncio.sleep(0.01)
    async with grpc.aio.insecure_channel(server.config.address(server.port)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while wait_serving and (await health.Check(health_pb2.HealthCheckRequest())).status != SERVING:
            await asyncio.sleep(0.02)
        try:
            yield server, channel, run
        finally:
            server.stopping.set()
            await asyncio.wait_for(run, 30)


def kserve_request(text: bytes, max_tokens: int):
    kpb, _ = kserve_protos()
    request = kpb.ModelInferRequest(model_name="stand-in")
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1])
    request.inputs.add(name="max_tokens", datatype="INT32", shape=[1, 1])
    request.raw_input_contents.extend([struct.pack("<I", len(text)) + text, struct.pack("<i", max_tokens)])
    return request


@contextlib.contextmanager
def held_port():
    """A loopback port another program listens on."""
    with socket.socket() as other_program:
        other_program.bind(("127.0.0.1", 0))
        other_program.listen()
        yield other_program.getsockname()[1]


# -- the engine fails ---------------------------------------------------------------------------


def test_commands_left_queued_by_a_failing_engine_are_answered():
    async def scenario():
        engine = StandInEngine()
        engine.gate = threading.Event()
        loop = EngineLoop(lambda: engine, max_queued_requests=8)
        await loop.start()
        stream = await loop.submit("a", [5, 6], SamplingParams(max_tokens=50))
        await asyncio.to_thread(engine.stepping.wait)
        # Sent while the failing step runs: the engine thread never takes them.
        engine.fail = True
        late_add = asyncio.create_task(loop.submit("b", [7], SamplingParams(max_tokens=5)))
        late_abort = asyncio.create_task(loop.abort("a"))
        await asyncio.sleep(0.05)
        engine.gate.set()
        with pytest.raises(EngineFailedError, match="fell over"):
            await asyncio.wait_for(late_add, 5)
        assert await asyncio.wait_for(late_abort, 5) is False
        with pytest.raises(EngineFailedError, match="fell over"):
            async for _ in stream:
                pass
        # After the failure, with no engine thread left.
        assert await asyncio.wait_for(loop.abort("a"), 5) is False
        with pytest.raises(EngineFailedError):
            await asyncio.wait_for(loop.submit("c", [8], SamplingParams(max_tokens=5)), 5)

    asyncio.run(scenario())


async def engine_failure_scenario():
    engine = StandInEngine()
    async with running_server(lambda: engine) as (_, channel, run):
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == SERVING
        call = jaxinfer_pb2_grpc.JaxinferStub(channel).Generate(
            pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(max_tokens=500)))
        await call.read()
        engine.fail = True
        with pytest.raises(grpc.RpcError) as err:
            while True:
                await call.read()
        assert err.value.code() == grpc.StatusCode.INTERNAL and "fell over" in err.value.details()
        assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING, "health still SERVING"
        assert await asyncio.wait_for(run, 10) == 1


def test_engine_failure_ends_requests_sets_not_serving_and_exits_1(in_worker):
    in_worker(engine_failure_scenario)


# -- tokenizing ---------------------------------------------------------------------------------


async def tokenizing_scenario():
    _, kserve_grpc = kserve_protos()
    engine = StandInEngine()
    async with running_server(lambda: engine) as (_, channel, _run):
        stub, health = jaxinfer_pb2_grpc.JaxinferStub(channel), health_pb2_grpc.HealthStub(channel)
        kserve = kserve_grpc.GRPCInferenceServiceStub(channel)
        engine.tokenizer.delay_s = 0.6
        chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hello")])
        slow = asyncio.gather(
            stub.GenerateUnary(pb.GenerateRequest(chat=chat, sampling=pb.SamplingParameters(max_tokens=2))),
            stub.Tokenize(pb.TokenizeRequest(text="tokenize me")),
            stub.Detokenize(pb.DetokenizeRequest(token_ids=[1, 2, 3])),
            kserve.ModelInfer(kserve_request(b"infer me", 2)))
        slowest = 0.0
        while not slow.done():
            start = time.monotonic()
            assert (await health.Check(health_pb2.HealthCheckRequest())).status == SERVING
            slowest = max(slowest, time.monotonic() - start)
        generated, tokenized, detokenized, inferred = await slow
        assert generated.usage.prompt_tokens == len("user: hello\n")
        assert list(tokenized.token_ids) == engine.tokenizer.encode("tokenize me")
        assert detokenized.text == "abc" and inferred.raw_output_contents
        assert slowest < 0.3, f"a health check waited {slowest:.2f} s behind the tokenizer"


def test_tokenizing_and_chat_templates_leave_the_event_loop_free(in_worker):
    in_worker(tokenizing_scenario)


# -- ports --------------------------------------------------------------------------------------


async def ports_in_use_scenario():
    async with running_server(StandInEngine) as (server, _, _run):
        with pytest.raises(ListenError, match=rf"cannot listen on 127\.0\.0\.1:{server.port}.*--port"):
            await new_server(StandInEngine, port=server.port).run()
    with held_port() as held:
        with pytest.raises(ListenError, match=rf"cannot listen on 127\.0\.0\.1:{held}"):
            await new_server(StandInEngine, port=held).run()
        with pytest.raises(ListenError, match=rf"metrics on 127\.0\.0\.1:{held}.*--metrics-port"):
            await new_server(StandInEngine, port=0, metrics_port=held).run()


def test_a_port_in_use_is_a_clear_error(in_worker):
    in_worker(ports_in_use_scenario)


def serve_command_on_a_held_port() -> tuple[int, int, str]:
    from jaxinfer.cli import main

    with held_port() as held, contextlib.redirect_stderr(io.StringIO()) as stderr:
        code = main(["serve", "tests/checkpoints/tiny-llama3", "--port", str(held)])
    return code, held, stderr.getvalue()


def test_serve_command_reports_a_port_in_use_in_one_line(in_worker):
    code, held, stderr = in_worker(serve_command_on_a_held_port)
    assert code == 2 and stderr.startswith(f"error: cannot listen on 127.0.0.1:{held}"), stderr
    assert "Traceback" not in stderr


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


async def ipv6_scenario(host: str):
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))
        metrics_port = probe.getsockname()[1]
    async with running_server(StandInEngine, host=host, metrics_port=metrics_port) as (server, channel, _run):
        assert server.config.address(server.port) == f"[::1]:{server.port}"
        reply = await jaxinfer_pb2_grpc.JaxinferStub(channel).GenerateUnary(
            pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(max_tokens=3)))
        assert reply.usage.completion_tokens == 3
        url = f"http://[::1]:{metrics_port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        assert "jaxinfer:request_success_total" in text


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_ipv6_host_serves_grpc_and_metrics(in_worker, host):
    in_worker(ipv6_scenario, host)


# -- KServe while loading -----------------------------------------------------------------------


async def kserve_loading_scenario():
    kpb, kserve_grpc = kserve_protos()
    loaded = threading.Event()

    def load():
        loaded.wait(10)
        return StandInEngine()

    async with running_server(load, wait_serving=False) as (_, channel, _run):
        kserve = kserve_grpc.GRPCInferenceServiceStub(channel)
        assert not (await kserve.ModelReady(kpb.ModelReadyRequest(name="stand-in"))).ready
        for call in (kserve.ModelInfer(kserve_request(b"hi", 2)),
                     kserve.ModelMetadata(kpb.ModelMetadataRequest(name="stand-in"))):
            with pytest.raises(grpc.RpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.value.details()
        loaded.set()
        while not (await kserve.ServerReady(kpb.ServerReadyRequest())).ready:
            await asyncio.sleep(0.02)
        assert (await kserve.ModelReady(kpb.ModelReadyRequest(name="stand-in"))).ready
        with pytest.raises(grpc.RpcError) as err:
            await kserve.ModelReady(kpb.ModelReadyRequest(name="another"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_kserve_is_unavailable_not_unknown_model_while_loading(in_worker):
    in_worker(kserve_loading_scenario)


# -- requests whose client left -----------------------------------------------------------------


def test_a_detached_request_is_observed_to_its_end_and_its_id_reusable():
    async def scenario():
        observed: list[RequestOutput] = []
        engine = StandInEngine()
        loop = EngineLoop(lambda: engine, max_queued_requests=8, on_output=lambda output, _: observed.append(output))
        await loop.start()
        async with await loop.submit("x", [5, 6, 7], SamplingParams(max_tokens=100)) as stream:
            await anext(stream)  # then the consumer leaves (as on a cancel or deadline)
        async with await loop.submit("x", [9], SamplingParams(max_tokens=3)) as stream:
            reused = [output async for output in stream]
        deadline = time.monotonic() + 5
        while not any(o.finished and o.prompt_token_ids == [5, 6, 7] for o in observed) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        loop.stop()
        [old_final] = [o for o in observed if o.finished and o.prompt_token_ids == [5, 6, 7]]
        assert old_final.outputs[0].finish_reason == "abort"
        assert [o.prompt_token_ids for o in reused] == [[9]] * 3
        assert reused[-1].outputs[0].finish_reason == "length"
        assert loop.num_active == 0

    asyncio.run(scenario())


async def cancel_and_deadline_metrics_scenario():
    engine = StandInEngine()
    async with running_server(lambda: engine, metrics_port=0) as (server, channel, _run):
        stub = jaxinfer_pb2_grpc.JaxinferStub(channel)
        long = pb.SamplingParameters(max_tokens=500)  # 5 s of steps
        cancelled = stub.Generate(pb.GenerateRequest(text="cancel me", sampling=long))
        await cancelled.read()
        cancelled.cancel()
        expiring = stub.Generate(pb.GenerateRequest(text="let me expire", sampling=long), timeout=1.0)
        await expiring.read()
        with pytest.raises(grpc.RpcError) as err:
            while await expiring.read() is not grpc.aio.EOF:
                pass
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        def sample(name: str, **labels) -> float:
            value = server.metrics.registry.get_sample_value(f"jaxinfer:{name}", {"model_name": "stand-in", **labels})
            return value or 0.0

        deadline = time.monotonic() + 5
        while sample("request_success_total", finished_reason="abort") < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert sample("request_success_total", finished_reason="abort") == 2
        assert sample("prompt_tokens_total") == len("cancel me") + len("let me expire")
        assert sample("e2e_request_latency_seconds_count") == 2


def test_requests_ended_by_cancel_or_deadline_are_counted_in_the_metrics(in_worker):
    in_worker(cancel_and_deadline_metrics_scenario)


# -- drain --------------------------------------------------------------------------------------


async def drain_abort_scenario():
    engine = StandInEngine()
    async with running_server(lambda: engine, drain_timeout_s=0.1) as (server, channel, run):
        call = jaxinfer_pb2_grpc.JaxinferStub(channel).Generate(
            pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(max_tokens=500)))
        await call.read()
        engine.step_s = 1.5  # the aborts wait for a step longer than the server's stop grace
        server.stopping.set()
        responses = []
        while (response := await call.read()) is not grpc.aio.EOF:
            responses.append(response)
        assert await call.code() == grpc.StatusCode.OK
        assert responses[-1].finished and responses[-1].outputs[0].finish_reason == pb.FINISH_REASON_ABORT
        assert await asyncio.wait_for(run, 10) == 0


def test_drain_timeout_ends_streams_with_their_abort_message(in_worker):
    in_worker(drain_abort_scenario)
