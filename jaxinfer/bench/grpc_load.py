"""Load generation against a running `jaxinfer serve` gRPC server (serving/protos/jaxinfer.proto).

`run_load(connection, requests, offsets=..., concurrency=..., sampling=...)` streams every request
through `Jaxinfer.Generate` (ignore_eos, exactly max_tokens, greedy unless `sampling`) and records
when each streamed chunk arrived, or why the request failed (a refusal such as RESOURCE_EXHAUSTED
when the server's queue is full ends that request, not the run). With `offsets`, request i is sent
`offsets[i]` s after the start (open loop: Poisson/gamma arrivals); with `concurrency`, at most that
many are in flight (closed loop); both together are a pool of clients under timed arrivals. Returns
one RequestTiming per request, in workload order, and the wall time of the run. `connection` is a
serving.client_connection.ServerConnection (address, TLS, bearer token).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grpc

from jaxinfer.bench.dataset import BenchRequest
from jaxinfer.bench.metrics import RequestTiming
from serving.client_connection import ServerConnection
from serving.protos import jaxinfer_pb2, jaxinfer_pb2_grpc


def generate_request(request: BenchRequest, sampling: Mapping[str, Any] | None = None) -> jaxinfer_pb2.GenerateRequest:
    """As jaxinfer.bench.engine_runs.bench_params: exactly max_tokens, greedy unless `sampling`."""
    return jaxinfer_pb2.GenerateRequest(
        token_ids=jaxinfer_pb2.TokenIds(ids=request.prompt_token_ids),
        sampling=jaxinfer_pb2.SamplingParameters(**{"temperature": 0.0, **(sampling or {})},
                                                 max_tokens=request.max_tokens, ignore_eos=True))


async def _stream(stub, metadata, request: BenchRequest, sampling, timing: RequestTiming) -> None:
    timing.arrival = time.perf_counter()
    finish_reasons = []
    try:
        async for response in stub.Generate(generate_request(request, sampling), metadata=metadata):
            timing.add_chunk(time.perf_counter(), sum(len(o.token_ids) for o in response.outputs))
            if response.finished:
                timing.num_cached_tokens = response.usage.cached_tokens
                finish_reasons = [jaxinfer_pb2.FinishReason.Name(o.finish_reason) for o in response.outputs]
    except grpc.RpcError as err:
        timing.error = f"{err.code().name}: {err.details()}"
        return
    # A stream the server ended early (an Abort RPC, its drain) is a failed request, not a short one.
    if "FINISH_REASON_ABORT" in finish_reasons or timing.num_output_tokens < request.max_tokens:
        timing.error = (f"ended after {timing.num_output_tokens} of {request.max_tokens} tokens "
                        f"({', '.join(finish_reasons) or 'no finished response'})")


async def _run(connection: ServerConnection, requests: Sequence[BenchRequest], offsets: Sequence[float] | None,
               concurrency: int | None, sampling: Mapping[str, Any] | None) -> tuple[list[RequestTiming], float]:
    timings = [RequestTiming(0.0, len(r.prompt_token_ids)) for r in requests]
    limit = asyncio.Semaphore(concurrency or len(requests))
    metadata = connection.metadata()
    async with connection.aio_channel() as channel:
        stub = jaxinfer_pb2_grpc.JaxinferStub(channel)
        start = time.perf_counter()

        async def send(i: int) -> None:
            if offsets is not None:
                await asyncio.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
            async with limit:
                await _stream(stub, metadata, requests[i], sampling, timings[i])

        await asyncio.gather(*(send(i) for i in range(len(requests))))
        return timings, time.perf_counter() - start


def run_load(connection: ServerConnection, requests: Sequence[BenchRequest], offsets: Sequence[float] | None = None,
             concurrency: int | None = None, sampling: Mapping[str, Any] | None = None
             ) -> tuple[list[RequestTiming], float]:
    return asyncio.run(_run(connection, requests, offsets, concurrency, sampling))


@contextlib.contextmanager
def server_tokenizer(connection: ServerConnection) -> Iterator[Callable[[str], list[int]]]:
    """An `encode(text) -> token ids` that asks the server's Tokenize (a --dataset's text prompts
    become the token ids the served model reads, with no tokenizer on the client)."""
    metadata = connection.metadata()
    with connection.channel() as channel:
        stub = jaxinfer_pb2_grpc.JaxinferStub(channel)

        def encode(text: str) -> list[int]:
            try:
                return list(stub.Tokenize(jaxinfer_pb2.TokenizeRequest(text=text), metadata=metadata,
                                          timeout=30).token_ids)
            except grpc.RpcError as err:
                raise connection.call_error(err, "Tokenize") from None

        yield encode


def model_info(connection: ServerConnection) -> jaxinfer_pb2.ModelInfoResponse:
    """The served model and its limits (vocab_size: random workloads draw prompt tokens below it;
    max_model_len: every request must fit it)."""
    with connection.channel() as channel:
        try:
            return jaxinfer_pb2_grpc.JaxinferStub(channel).ModelInfo(
                jaxinfer_pb2.ModelInfoRequest(), metadata=connection.metadata(), timeout=30)
        except grpc.RpcError as err:
            raise connection.call_error(err, "model info") from None
