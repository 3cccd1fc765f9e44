"""The engine thread and its bridge to the asyncio server.

The LLMEngine is single-threaded, so one dedicated thread creates it, then loops: apply queued
commands (add, abort), run `engine.step()`, and hand the step's RequestOutputs to the event loop
in one `call_soon_threadsafe` call. Everything per client (protobuf building, sending, metrics,
waiting on slow readers) happens on the asyncio side, so the engine never waits on a client.

asyncio side:
    stream = await loop.submit(request_id, prompt_token_ids, params, priority)
    async with stream:                 # leaving early (cancel, deadline) aborts the request
        async for output in stream:    # RequestOutput, incremental deltas; the last is finished
            ...
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from jaxinfer.engine.llm_engine import LLMEngine
from jaxinfer.engine.outputs import RequestOutput
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.scheduler.scheduler import SchedulerMetrics
from serving.errors import (DrainingError, DuplicateRequestError, EngineFailedError, NotReadyError,
                            OverloadedError, RequestFailedError)

log = logging.getLogger(__name__)

# How often the engine thread refreshes the scheduler snapshot that /metrics reads.
_SNAPSHOT_INTERVAL_S = 0.05


@dataclasses.dataclass(frozen=True)
class EngineSnapshot:
    """What the engine thread publishes for other threads: scheduler state and step timing."""

    scheduler: SchedulerMetrics
    num_steps: int
    step_seconds_total: float


class RequestStream:
    """The outputs of one request, consumed on the event loop."""

    def __init__(self, request_id: str, owner: EngineLoop):
        self.request_id = request_id
        self._owner = owner
        self._outputs: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        self.finished = False
        self.last_token_time: float | None = None  # engine clock, for inter-token latency

    def put(self, item: RequestOutput | Exception) -> None:
        self._outputs.put_nowait(item)

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._outputs.get()
        if isinstance(item, Exception):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc_info) -> None:
        if not self.finished:
            self._owner.abort_detached(self.request_id)


class EngineLoop:
    """Owns the engine thread; its public methods are called on the event loop."""

    def __init__(self, engine_factory: Callable[[], LLMEngine], max_queued_requests: int,
                 on_output: Callable[[RequestOutput, RequestStream], None] = lambda output, stream: None):
        self._engine_factory = engine_factory
        self.max_queued_requests = max_queued_requests
        self._on_output = on_output
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        # Requests whose consumer left (cancel, deadline) until their final output: still counted
        # in the metrics, delivered to no one.
        self._detached: dict[str, RequestStream] = {}
        self._thread = threading.Thread(target=self._run, name="jaxinfer-engine", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future | None = None
        self.engine: LLMEngine | None = None  # set once loaded; read-only off the engine thread
        self.snapshot: EngineSnapshot | None = None
        self.admitting = True
        self.failure: str | None = None
        self.failed = asyncio.Event()  # set with `failure`: the engine serves no more requests

    # -- event-loop side --------------------------------------------------------------------

    async def start(self) -> LLMEngine:
        """Starts the thread, which builds the engine; returns it once loaded."""
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        self._thread.start()
        return await self._ready

    @property
    def num_active(self) -> int:
        return len(self._streams)

    async def submit(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
                     priority: int = 0) -> RequestStream:
        if self.engine is None:
            raise NotReadyError("the engine is still loading; retry when the health check reports SERVING")
        if self.failure is not None:
            raise EngineFailedError(f"the engine failed and serves no more requests: {self.failure}")
        if not self.admitting:
            raise DrainingError("the server is draining (shutting down) and admits no new requests")
        if request_id in self._streams:
            raise DuplicateRequestError(f"request id {request_id!r} is already running; use a unique id")
        if len(self._streams) >= self.max_queued_requests:
            raise OverloadedError(f"the server already holds {len(self._streams)} requests (its limit); "
                                  "retry later")
        stream = RequestStream(request_id, self)
        self._streams[request_id] = stream
        accepted = self._loop.create_future()
        self._send(("add", request_id, list(prompt_token_ids), params, priority, time.monotonic(), accepted))
        try:
            await accepted
        except BaseException:
            # Rejected, or cancelled while the engine thread had the add in hand (then it may be
            # running): an abort of a request the engine does not hold is a no-op.
            self.abort_detached(request_id)
            raise
        return stream

    async def abort(self, request_id: str) -> bool:
        """Ends a request now; its stream gets a final output with finish reason "abort"."""
        if self.failure is not None:  # every request has ended, and no engine thread would answer
            return False
        found = self._loop.create_future()
        self._send(("abort", request_id, found))
        return await found

    def abort_detached(self, request_id: str) -> None:
        """Aborts a request whose consumer is gone (cancelled, deadline): its outputs still reach
        the metrics hook, and nothing is delivered."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._detached[request_id] = stream
            self._send(("detach", request_id, stream))

    def abort_all(self) -> None:
        for request_id in list(self._streams):
            self._send(("abort", request_id, None))

    def stop(self) -> None:
        self._send(("stop",))
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _send(self, command: tuple) -> None:
        self._commands.put(command)

    def _resolve(self, future: asyncio.Future, result=None, error: Exception | None = None) -> None:
        if not future.done():
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            # A detached id's outputs are the old request's until its final one, even when a new
            # request already reuses the id.
            holder = self._detached if output.request_id in self._detached else self._streams
            stream = holder.get(output.request_id)
            if stream is None:
                continue
            self._on_output(output, stream)
            if holder is self._streams:
                stream.put(output if output.error is None else RequestFailedError(output.error))
            if output.finished or output.error is not None:
                del holder[output.request_id]

    def _forget_detached(self, request_id: str, stream: RequestStream) -> None:
        """Drops a detached request the engine did not hold (so no final output will come)."""
        if self._detached.get(request_id) is stream:
            del self._detached[request_id]

    def _fail_all(self, message: str) -> None:
        """Ends every request and answers every command the engine thread left behind."""
        self.failure = message
        error = EngineFailedError(f"the engine failed and serves no more requests: {message}")
        for stream in self._streams.values():
            stream.put(error)
        self._streams.clear()
        self._detached.clear()
        # Commands sent before `failure` was set; later ones are refused where they are made.
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "add":
                self._resolve(command[-1], None, error)
            elif command[0] == "abort" and command[2] is not None:
                self._resolve(command[2], False)
        self.failed.set()

    # -- engine thread ------------------------------------------------------------------------

    def _call_soon(self, fn, *args) -> None:
        self._loop.call_soon_threadsafe(fn, *args)

    def _run(self) -> None:
        try:
            engine = self._engine_factory()
        except Exception as err:  # reported to the starter, which exits with the message
            self._call_soon(self._resolve, self._ready, None, err)
            return
        self.engine = engine
        self._publish_snapshot(engine, 0.0)
        self._call_soon(self._resolve, self._ready, engine)
        try:
            self._serve(engine)
        except Exception as err:
            log.exception("engine step failed")
            self._call_soon(self._fail_all, f"{type(err).__name__}: {err}")

    def _serve(self, engine: LLMEngine) -> None:
        step_seconds, last_snapshot = 0.0, 0.0
        while True:
            # Wait for a command only while idle. Each is applied as it is taken, so those left
            # queued when the engine fails are all answered by _fail_all.
            outputs: list[RequestOutput] = []
            block = not engine.has_unfinished_requests()
            while True:
                try:
                    command = self._commands.get(block=block)
                except queue.Empty:
                    break
                if command[0] == "stop":
                    return
                outputs.extend(self._apply(engine, command))
                block = False
            if engine.has_unfinished_requests():
                start = time.perf_counter()
                outputs = outputs + engine.step()
                step_seconds += time.perf_counter() - start
            if outputs:
                self._call_soon(self._deliver, outputs)
            now = time.monotonic()
            if now - last_snapshot >= _SNAPSHOT_INTERVAL_S or not engine.has_unfinished_requests():
                self._publish_snapshot(engine, step_seconds)
                last_snapshot = now

    def _apply(self, engine: LLMEngine, command: tuple) -> list[RequestOutput]:
        if command[0] == "add":
            _, request_id, prompt_token_ids, params, priority, arrival, accepted = command
            try:
                engine.add_request(request_id, params=params, prompt_token_ids=prompt_token_ids,
                                   priority=priority, arrival_time=arrival)
            except Exception as err:  # RequestError for bad input; anything else fails this request only
                self._call_soon(self._resolve, accepted, None, err)
            else:
                self._call_soon(self._resolve, accepted, True)
            return []
        kind, request_id, reply = command  # reply: the Abort caller's future, or the detached stream
        output = None
        try:
            output = engine.abort(request_id)
        finally:  # the caller is answered even when the engine fails here
            if kind == "abort" and reply is not None:
                self._call_soon(self._resolve, reply, output is not None)
        if output is None:
            if kind == "detach":
                self._call_soon(self._forget_detached, request_id, reply)
            return []
        return [output]

    def _publish_snapshot(self, engine: LLMEngine, step_seconds: float) -> None:
        self.snapshot = EngineSnapshot(engine.metrics(), engine.num_steps, step_seconds)
