"""Prometheus metrics of the server, named as vLLM users know them (`jaxinfer:` prefix).

Per-request figures (token counters, TTFT, inter-token latency, end-to-end latency, queue time)
are observed on the event loop as outputs arrive; engine state (running/waiting, KV cache usage and
fragmentation, prefix cache, preemptions, step time) is read at scrape time from the snapshot the
engine thread publishes, so the engine thread never touches prometheus.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jaxinfer.engine.outputs import RequestOutput
from serving.engine_loop import EngineSnapshot, RequestStream

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0)


class _EngineStateCollector:
    def __init__(self, snapshot: Callable[[], EngineSnapshot | None], model_name: str):
        self._snapshot, self._model_name = snapshot, model_name

    def _family(self, kind, name: str, doc: str, value: float):
        family = kind(name, doc, labels=["model_name"])
        family.add_metric([self._model_name], value)
        return family

    def collect(self):
        snapshot = self._snapshot()
        if snapshot is None:
            return
        scheduler, blocks = snapshot.scheduler, snapshot.scheduler.blocks
        yield self._family(GaugeMetricFamily, "jaxinfer:num_requests_running",
                           "Sequences in the engine's running batch.", scheduler.num_running)
        yield self._family(GaugeMetricFamily, "jaxinfer:num_requests_waiting",
                           "Sequences waiting to be scheduled.", scheduler.num_waiting)
        yield self._family(GaugeMetricFamily, "jaxinfer:kv_cache_usage_perc",
                           "Fraction of KV cache blocks in use (1 = full).", blocks.kv_cache_usage)
        yield self._family(GaugeMetricFamily, "jaxinfer:kv_cache_fragmentation_perc",
                           "Fraction of the slots of in-use KV cache blocks that hold no token.",
                           blocks.fragmentation)
        yield self._family(CounterMetricFamily, "jaxinfer:prefix_cache_queries",
                           "Prompt tokens looked up in the prefix cache.", blocks.prefix_cache_queries)
        yield self._family(CounterMetricFamily, "jaxinfer:prefix_cache_hits",
                           "Prompt tokens found in the prefix cache.", blocks.prefix_cache_hits)
        yield self._family(CounterMetricFamily, "jaxinfer:num_preemptions",
                           "Sequences preempted (recomputed) since start.", scheduler.num_preemptions)
        yield self._family(CounterMetricFamily, "jaxinfer:engine_steps", "Engine steps run.", snapshot.num_steps)
        yield self._family(CounterMetricFamily, "jaxinfer:engine_step_seconds",
                           "Wall time spent in engine.step().", snapshot.step_seconds_total)


class ServerMetrics:
    """The server's registry; `observe` is the EngineLoop's per-output hook."""

    def __init__(self, model_name: str, snapshot: Callable[[], EngineSnapshot | None],
                 registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = {"labelnames": ["model_name"], "registry": self.registry}

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, buckets=_LATENCY_BUCKETS, **labels)

        self._prompt_tokens = Counter("jaxinfer:prompt_tokens", "Prompt tokens of finished requests.", **labels)
        self._generation_tokens = Counter("jaxinfer:generation_tokens", "Generated tokens.", **labels)
        self._finished = Counter("jaxinfer:request_success", "Finished requests by finish reason.",
                                 labelnames=["model_name", "finished_reason"], registry=self.registry)
        self._ttft = histogram("jaxinfer:time_to_first_token_seconds", "Time to first token.")
        self._itl = histogram("jaxinfer:inter_token_latency_seconds", "Time between engine outputs of a request.")
        self._e2e = histogram("jaxinfer:e2e_request_latency_seconds", "Arrival to finish.")
        self._queue = histogram("jaxinfer:request_queue_time_seconds", "Arrival to first scheduling.")
        self._model_name = model_name
        self.registry.register(_EngineStateCollector(snapshot, model_name))

    def observe(self, output: RequestOutput, stream: RequestStream) -> None:
        name, timing = self._model_name, output.metrics
        new_tokens = sum(len(c.delta_token_ids) for c in output.outputs)
        if new_tokens:
            self._generation_tokens.labels(name).inc(new_tokens)
            if stream.last_token_time is None:
                if timing.ttft is not None:
                    self._ttft.labels(name).observe(timing.ttft)
                if timing.queue_time is not None:
                    self._queue.labels(name).observe(timing.queue_time)
            elif timing.last_token_time is not None:
                self._itl.labels(name).observe(timing.last_token_time - stream.last_token_time)
            stream.last_token_time = timing.last_token_time
        if output.finished:
            self._prompt_tokens.labels(name).inc(len(output.prompt_token_ids))
            reason = output.outputs[0].finish_reason if output.outputs else "abort"
            self._finished.labels(name, reason or "abort").inc()
            if timing.finished_time is not None:
                self._e2e.labels(name).observe(timing.finished_time - timing.arrival_time)


def serve_http(registry: CollectorRegistry, host: str, port: int) -> int:
    """Starts the /metrics HTTP server of `registry` in a daemon thread; returns the bound port.
    `host` is bare (an IPv6 address without brackets)."""
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server.server_port
