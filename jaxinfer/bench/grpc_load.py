"""Load generation against a running `jaxinfer serve` gRPC server (serving/protos/jaxinfer.proto).

`run_load(target, requests, offsets=..., concurrency=...)` streams every request through
`Jaxinfer.Generate` (greedy, ignore_eos, exactly max_tokens) and records when each streamed
chunk arrived. With `offsets`, request i is sent `offsets[i]` s after the start (open loop:
Poisson/gamma arrivals); with `concurrency`, at most that many are in flight (closed loop).
Returns one RequestTiming per request, in workload order, and the wall time of the run.
"""

from __future__ import annotations

import asyncio
import time
from typing import Sequence

import grpc

from jaxinfer.bench.dataset import BenchRequest
from jaxinfer.bench.metrics import RequestTiming
from jaxinfer.errors import EngineError, RequestError
from serving.protos import jaxinfer_pb2, jaxinfer_pb2_grpc


def generate_request(request: BenchRequest) -> jaxinfer_pb2.GenerateRequest:
    return jaxinfer_pb2.GenerateRequest(
        token_ids=jaxinfer_pb2.TokenIds(ids=request.prompt_token_ids),
        sampling=jaxinfer_pb2.SamplingParameters(max_tokens=request.max_tokens, temperature=0.0, ignore_eos=True))


async def _stream(stub, request: BenchRequest, timing: RequestTiming) -> None:
    timing.arrival = time.perf_counter()
    async for response in stub.Generate(generate_request(request)):
        timing.add_chunk(time.perf_counter(), sum(len(o.token_ids) for o in response.outputs))


async def _run(target: str, requests: Sequence[BenchRequest], offsets: Sequence[float] | None,
               concurrency: int | None) -> tuple[list[RequestTiming], float]:
    timings = [RequestTiming(0.0, len(r.prompt_token_ids)) for r in requests]
    limit = asyncio.Semaphore(concurrency or len(requests))
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout=30)
        except asyncio.TimeoutError:
            raise EngineError(f"no gRPC server answers at {target}; start one with `jaxinfer serve`") from None
        stub = jaxinfer_pb2_grpc.JaxinferStub(channel)
        start = time.perf_counter()

        async def send(i: int) -> None:
            if offsets is not None:
                await asyncio.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
            async with limit:
                await _stream(stub, requests[i], timings[i])

        await asyncio.gather(*(send(i) for i in range(len(requests))))
        return timings, time.perf_counter() - start


def run_load(target: str, requests: Sequence[BenchRequest], offsets: Sequence[float] | None = None,
             concurrency: int | None = None) -> tuple[list[RequestTiming], float]:
    return asyncio.run(_run(target, requests, offsets, concurrency))


def model_vocab_size(target: str) -> int:
    """The served model's vocabulary size (random workloads draw prompt tokens below it)."""
    with grpc.insecure_channel(target) as channel:
        try:
            info = jaxinfer_pb2_grpc.JaxinferStub(channel).ModelInfo(jaxinfer_pb2.ModelInfoRequest(), timeout=30)
        except grpc.RpcError as err:
            raise RequestError(f"{target} did not answer the model info request ({err.code().name}: "
                               f"{err.details()}): start `jaxinfer serve` there and wait until it is ready, or "
                               "fix --target") from None
    return info.vocab_size
