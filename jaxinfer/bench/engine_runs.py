"""Driving an in-process LLMEngine through a workload, with continuous or static batching.

`drive(engine, requests, offsets, static_batch, max_in_flight, sampling)` submits request i at
`offsets[i]` seconds after the start (all zeros: offline, everything submitted at once), or once
fewer than `max_in_flight` requests are unfinished (a pool of clients: its clock starts when it is
submitted), and steps the engine until every request has finished, returning one `RequestTiming`
per request (in workload order) and the wall time of the run. Generation ignores EOS, so every
request produces exactly its `max_tokens` tokens in every system compared; it is greedy unless
`sampling` sets temperature, top_p or top_k. With a `KVUsage`, the scheduler's KV pool is sampled
after every engine call: how full it got, and how much of the blocks in use held no token.

Static batching (`static_batch=B`) is the pre-Orca baseline on the same compiled model: it
admits up to B requests that have arrived as one batch, steps until the batch finishes, then admits
the next; continuous batching (`static_batch=None`) admits every arrived request before each step.
A static batch is a rectangle, as in `generate` with padding: every member's prompt is left-padded
to the batch's longest prompt and every member decodes for the batch's longest output, so the batch
keeps its size until its longest member finishes. Only a member's own tokens are counted and timed
(its last one ends its latency); the padding is the work static batching does and wastes. (Letting
finished members leave and the batch shrink is in-flight batching's first half, not the baseline.)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

from jaxinfer.bench.dataset import BenchRequest
from jaxinfer.bench.metrics import RequestTiming
from jaxinfer.engine.llm_engine import LLMEngine
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.scheduler.scheduler import SchedulerMetrics


class KVUsage:
    """The KV pool over a run, from the scheduler's metrics after each engine call (`record`; a
    multi-step decode call once). Its summary: the peak and mean share of the pool's blocks in use,
    the share of the slots of blocks in use that held no token over the run (paged attention's
    waste: under one block per sequence; a static batch's padding counts as tokens, its waste lies
    there instead), the most sequences running at once, and the preemptions during the run."""

    def __init__(self, before: SchedulerMetrics):
        self.num_blocks, self.block_size = before.blocks.num_blocks, before.blocks.block_size
        self.preemptions_before = self.preemptions = before.num_preemptions
        self.steps = self.used_blocks = self.unfilled_slots = self.peak_used_blocks = self.peak_running = 0

    def record(self, metrics: SchedulerMetrics) -> None:
        self.steps += 1
        self.used_blocks += metrics.blocks.num_used_blocks
        self.unfilled_slots += metrics.blocks.num_unfilled_slots
        self.peak_used_blocks = max(self.peak_used_blocks, metrics.blocks.num_used_blocks)
        self.peak_running = max(self.peak_running, metrics.num_running)
        self.preemptions = metrics.num_preemptions

    def summary(self) -> dict:
        return {"num_blocks": self.num_blocks, "block_size": self.block_size,
                "peak_usage": self.peak_used_blocks / self.num_blocks,
                "mean_usage": self.used_blocks / max(self.steps, 1) / self.num_blocks,
                "unfilled_slot_fraction": self.unfilled_slots / max(self.used_blocks * self.block_size, 1),
                "peak_running_sequences": self.peak_running, "preemptions": self.preemptions - self.preemptions_before}


def bench_params(max_tokens: int, sampling: Mapping[str, Any] | None = None) -> SamplingParams:
    """Exactly `max_tokens` tokens (EOS ignored), greedy unless `sampling` (SamplingParams fields:
    temperature, top_p, top_k) says otherwise."""
    return SamplingParams(**{"temperature": 0.0, **(sampling or {})}, max_tokens=max_tokens, ignore_eos=True)


def static_rectangle(batch: Sequence[BenchRequest]) -> list[BenchRequest]:
    """The batch as static batching runs it: prompts left-padded to the longest (each with its own
    first token, so that no two members share a prefix-cache block) and every output as long as the
    longest."""
    prompt_len = max(len(r.prompt_token_ids) for r in batch)
    max_tokens = max(r.max_tokens for r in batch)
    return [dataclasses.replace(r, max_tokens=max_tokens, prompt_token_ids=(
        (r.prompt_token_ids[0],) * (prompt_len - len(r.prompt_token_ids)) + tuple(r.prompt_token_ids)))
        for r in batch]


def drive(engine: LLMEngine, requests: Sequence[BenchRequest], offsets: Sequence[float],
          static_batch: int | None = None, max_in_flight: int | None = None,
          sampling: Mapping[str, Any] | None = None, kv_usage: KVUsage | None = None
          ) -> tuple[list[RequestTiming], float]:
    start = time.perf_counter()
    timings = [RequestTiming(start + float(offset), len(r.prompt_token_ids)) for r, offset in zip(requests, offsets)]
    # Requests in arrival order; `admitted` counts how many have been handed to the engine;
    # `finish_times` holds when each finished request ended, in order (each frees a client).
    order = sorted(range(len(requests)), key=lambda i: timings[i].arrival)
    admitted, finish_times = 0, []
    while admitted < len(order) or engine.has_unfinished_requests():
        now = time.perf_counter()
        arrived = admitted
        while arrived < len(order) and timings[order[arrived]].arrival <= now:
            arrived += 1
        if max_in_flight is not None:
            arrived = min(arrived, len(finish_times) + max_in_flight)
        if static_batch is not None:
            arrived = admitted if engine.has_unfinished_requests() else min(arrived, admitted + static_batch)
        if max_in_flight is not None:
            # The request admitted j-th (from 0) was sent once a client was free: when the
            # (j - max_in_flight)-th request to finish ended, if that is after its arrival.
            for j in range(max(admitted, max_in_flight), arrived):
                timings[order[j]].arrival = max(timings[order[j]].arrival, finish_times[j - max_in_flight])
        admitting = [requests[i] for i in order[admitted:arrived]]
        if static_batch is not None and admitting:
            admitting = static_rectangle(admitting)
        for i, request in zip(order[admitted:arrived], admitting):
            engine.add_request(f"bench-{i}", prompt_token_ids=request.prompt_token_ids,
                               params=bench_params(request.max_tokens, sampling), arrival_time=time.monotonic())
        admitted = arrived
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, timings[order[admitted]].arrival - time.perf_counter()))
            continue
        outputs = engine.step()
        now = time.perf_counter()
        if kv_usage is not None:
            kv_usage.record(engine.scheduler.metrics())
        for output in outputs:
            i = int(output.request_id.removeprefix("bench-"))
            own_tokens_left = requests[i].max_tokens - timings[i].num_output_tokens
            timings[i].add_chunk(now, min(own_tokens_left, len(output.outputs[0].delta_token_ids)))
            timings[i].num_cached_tokens = output.num_cached_tokens
            if output.finished:
                finish_times.append(now)
    return timings, time.perf_counter() - start
