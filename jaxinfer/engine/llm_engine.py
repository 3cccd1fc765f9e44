"""LLMEngine: the request loop that ties the scheduler to the compiled model step.

The contract (one engine, one thread drives it):
    add_request(request_id, prompt | prompt_token_ids, SamplingParams, priority)  validates and queues
    step() -> list[RequestOutput]   runs one scheduled call (one model step, or up to decode_steps
                                    decode steps) and reports every request that got tokens or
                                    finished (incremental `delta_*` and cumulative text)
    abort(request_id) -> RequestOutput | None   ends a request now; its KV blocks return at once
    has_unfinished_requests() / metrics()

Stop strings are matched on detokenized text (jaxinfer.detokenizer) here, after the step; token
stops (eos, stop ids, max_tokens) are the scheduler's. As in vLLM, a stop string ends a sample with
reason "stop" even on its last allowed token, and the text of a stop token is left out unless
include_stop_str_in_output.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from typing import Sequence as Seq

from jaxinfer.detokenizer import IncrementalDetokenizer
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jaxinfer.errors import RequestError
from jaxinfer.model.config import ModelConfig
from jaxinfer.runner.model_runner import ModelRunner, SampledToken
from jaxinfer.runner.sampling import DEFAULT_SUPPRESS_LEN
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.scheduler.block_manager import BlockManager
from jaxinfer.scheduler.request import Sequence
from jaxinfer.scheduler.scheduler import Scheduler, SchedulerMetrics
from jaxinfer.tokenizer import Tokenizer


@dataclasses.dataclass
class _RequestState:
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    metrics: RequestMetrics
    completions: dict[int, CompletionOutput] = dataclasses.field(default_factory=dict)
    detokenizers: dict[int, IncrementalDetokenizer] = dataclasses.field(default_factory=dict)
    seqs: dict[int, Sequence] = dataclasses.field(default_factory=dict)
    error: str | None = None

    @property
    def finished(self) -> bool:
        seqs = self.seqs.values()
        return all(s.is_finished for s in seqs) and (
            len(self.seqs) == self.params.n or any(s.finish_reason == "abort" for s in seqs))


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, model_cfg: ModelConfig,
                 engine_cfg: EngineConfig, enable_prefix_caching: bool = True):
        self.runner, self.tokenizer = runner, tokenizer
        self.model_cfg, self.engine_cfg = model_cfg, engine_cfg
        block_manager = BlockManager(runner.num_blocks, engine_cfg.block_size, enable_prefix_caching)
        self.scheduler = Scheduler(block_manager, engine_cfg.max_num_seqs, engine_cfg.max_num_batched_tokens,
                                   engine_cfg.max_model_len, eos_token_ids=tokenizer.eos_token_ids,
                                   decode_steps=engine_cfg.decode_steps,
                                   decode_call_tokens=engine_cfg.decode_call_tokens)
        self._requests: dict[str, _RequestState] = {}
        self.num_steps = 0

    # -- requests -----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | None = None, params: SamplingParams | None = None,
                    prompt_token_ids: Seq[int] | None = None, priority: int = 0,
                    arrival_time: float | None = None) -> None:
        params = params or SamplingParams()
        if (prompt is None) == (prompt_token_ids is None):
            raise RequestError("give exactly one of a text prompt or prompt token ids")
        # The scheduler owns the request checks (unique id, non-empty prompt); this one only spares
        # tokenizing the prompt of a request it would reject.
        if prompt is not None and request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already in use; give each request a unique id")
        ids = self.tokenizer.encode(prompt) if prompt is not None else [int(t) for t in prompt_token_ids]
        if params.min_tokens:
            held_back = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.tokenizer.eos_token_ids))
            if len(held_back) > DEFAULT_SUPPRESS_LEN:
                raise RequestError(
                    f"min_tokens holds back the request's stop and eos token ids until it is reached, at most "
                    f"{DEFAULT_SUPPRESS_LEN} of them; this one has {len(held_back)}: pass fewer stop_token_ids")
        vocab = self.model_cfg.vocab_size
        for what, tokens in (("prompt token ids", ids), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in tokens if not 0 <= t < vocab]
            if bad:
                raise RequestError(f"{what} {bad[:5]} are outside the vocabulary [0, {vocab})")
        limit = self.engine_cfg.max_model_len
        if len(ids) + params.max_tokens > limit:
            raise RequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds max_model_len ({limit}); "
                "shorten the prompt or lower max_tokens")
        now = time.monotonic() if arrival_time is None else arrival_time
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        state = _RequestState(ids, params, seed, RequestMetrics(now))
        # Everything that can fail comes before the scheduler takes the request: a request it
        # queued without the engine's state would break every later step.
        self._open_sample(state, 0)
        state.seqs[0] = self.scheduler.add_request(request_id, ids, params, priority, now)
        self._requests[request_id] = state

    def abort(self, request_id: str) -> RequestOutput | None:
        state = self._requests.get(request_id)
        if state is None:
            return None
        for seq in self.scheduler.abort(request_id):
            self._end_without_token(state, seq)
        return self._report(request_id, state)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def metrics(self) -> SchedulerMetrics:
        return self.scheduler.metrics()

    # -- the loop ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        changed: dict[str, None] = {}  # request ids in order of first change
        for seq in out.failed:
            state = self._requests[seq.request_id]
            state.error = seq.error
            self._end_without_token(state, seq)
            changed[seq.request_id] = None
        if not out.is_empty:
            now = time.monotonic()
            for entry in out.scheduled:
                metrics = self._requests[entry.seq.request_id].metrics
                metrics.first_scheduled_time = metrics.first_scheduled_time or now
            steps = self.runner.execute(out, lambda rid: self._requests[rid].seed)
            self.num_steps += len(steps)
            now = time.monotonic()
            # A multi-step call's tokens are recorded step by step, as single steps would be: a
            # sequence that stops (on a token, a length or a stop string) skips the later ones.
            for index, sampled in enumerate(steps):
                step_out = out.model_step(index)
                by_seq = {(e.seq.request_id, e.seq.seq_index + j): token
                          for e, tokens in zip(step_out.scheduled, sampled) for j, token in enumerate(tokens)}
                for seq in self.scheduler.update(step_out, [[t.token_id for t in tokens] for tokens in sampled]):
                    self._on_token(seq, by_seq[seq.seq_id], now)
                    changed[seq.request_id] = None
        return [self._report(rid, self._requests[rid]) for rid in changed]

    def _open_sample(self, state: _RequestState, index: int) -> None:
        """Starts the output of sample `index`: its completion and its detokenizer."""
        params = state.params
        state.detokenizers[index] = IncrementalDetokenizer(
            self.tokenizer.backend, state.prompt_token_ids, skip_special_tokens=True, stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output, min_tokens=params.min_tokens)
        state.completions[index] = CompletionOutput(index, logprobs=[] if params.logprobs is not None else None)

    def _end_without_token(self, state: _RequestState, seq: Sequence) -> None:
        """Records a sample the scheduler ended between tokens (abort, failure), with the text its
        detokenizer still held back, so that the text matches the tokens."""
        completion = state.completions[seq.seq_index]
        _append_text(completion, state.detokenizers[seq.seq_index].finish()[0])
        completion.finish_reason = seq.finish_reason

    def _on_token(self, seq: Sequence, token: SampledToken, now: float) -> None:
        state = self._requests[seq.request_id]
        if seq.seq_index not in state.seqs:  # a sample forked off sample 0 in this step (n > 1)
            state.seqs[seq.seq_index] = seq
            self._open_sample(state, seq.seq_index)
        completion = state.completions[seq.seq_index]
        completion.token_ids.append(token.token_id)
        completion.delta_token_ids.append(token.token_id)
        if completion.logprobs is not None:
            top = {int(i): float(lp) for i, lp in zip(token.top_ids[:state.params.logprobs],
                                                      token.top_logprobs[:state.params.logprobs])}
            completion.logprobs.append({token.token_id: token.logprob, **top})
        detokenizer = state.detokenizers[seq.seq_index]
        # vLLM leaves the text of the token that stopped the sample (eos, a stop id) out of the
        # output unless include_stop_str_in_output; the token stays in token_ids.
        stopped_by_token = seq.finish_reason == "stop" and not state.params.include_stop_str_in_output
        text, stop_hit = ("", None) if stopped_by_token else detokenizer.add_tokens([token.token_id])
        if stop_hit is None and seq.is_finished:  # release text held back for a possible stop string
            held, stop_hit = detokenizer.finish()
            text += held
        _append_text(completion, text)
        if stop_hit is not None:
            # "stop" even when this token also reached max_tokens and the scheduler already finished
            # the sample by length (its finish() is then a no-op), as vLLM reports it.
            self.scheduler.finish(seq, "stop")
            completion.finish_reason = "stop"
        elif seq.is_finished:
            completion.finish_reason = seq.finish_reason
        state.metrics.first_token_time = state.metrics.first_token_time or now
        state.metrics.last_token_time = now

    def _report(self, request_id: str, state: _RequestState) -> RequestOutput:
        finished = state.finished
        if finished:
            state.metrics.finished_time = time.monotonic()
            del self._requests[request_id]
        # Snapshots (the engine keeps appending to its own lists), built field by field:
        # dataclasses.replace cost three times as much, per request and step.
        outputs = [CompletionOutput(c.index, c.text, list(c.token_ids), None if c.logprobs is None else list(c.logprobs),
                                    c.finish_reason, c.delta_text, c.delta_token_ids)
                   for c in (state.completions[i] for i in sorted(state.completions))]
        for completion in state.completions.values():
            completion.delta_text, completion.delta_token_ids = "", []
        first = state.seqs[0]
        return RequestOutput(request_id, state.prompt_token_ids, outputs, finished,
                             first.num_cached_tokens or 0, state.metrics, state.error)


def _append_text(completion: CompletionOutput, text: str) -> None:
    """Adds text to a completion's cumulative text and to this step's delta."""
    completion.text += text
    completion.delta_text += text
