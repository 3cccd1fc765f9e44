"""Continuous batching: which sequences run in the next model step, and with how many tokens.

Each `schedule()` builds one flat ragged batch under two budgets, `max_num_seqs` sequences and
`max_num_batched_tokens` tokens:

1. decodes of running sequences (1 token each), in service order (priority, then arrival);
2. the next chunks of running sequences still prefilling;
3. new or preempted sequences from the waiting queue, strictly in service order, with their
   longest prefix-cache hit and a prefill chunk that fills the remaining token budget
   (chunked prefill: a long prompt never stalls the decodes of other streams).

When a running sequence cannot get a block, the lowest-ranked running sequence (possibly itself;
one already scheduled in this step is taken out of it, with its tokens and block copies) is
preempted by recompute: its blocks are freed and it waits at the front of its priority class to
prefill prompt + generated tokens again. So a high-priority prompt still prefilling takes blocks
from lower-priority decodes, though decodes are scheduled first. A sequence that cannot fit
even alone in the pool is finished with reason "abort" and an `error` message instead, so the loop
always progresses. No waiting sequence is admitted in a step that preempted.

Sampling `n > 1`: the step that computes a parent's last prompt token has `num_samples = n`; the
runner draws n independent tokens from that one position's logits (one PRNG stream per sample
index) and `update` receives them as a list. The scheduler then forks the parent into n sequences
sharing all its blocks; the next write into the shared, partially filled last block produces a
copy-on-write `(src, dst)` pair in `SchedulerOutput.block_copies`.

Multi-step decode (`decode_steps` > 1): a step in which every entry decodes one token becomes a
call of `num_steps` model steps, bounded by `decode_call_tokens` tokens per call and by each
sequence's max_tokens, max_model_len and min_tokens (the device cannot finish a sequence, and bans
stop tokens by the output count at the call's start), with the slots of all of them allocated now.
The runner feeds each step's tokens to the next; `update` then takes them one model step at a time
(`SchedulerOutput.model_step(i)`), and a sequence that finished skips the rest.

The engine loop is `out = schedule()`, run the step (block copies first), `update(out, tokens)`;
one step is in flight at a time. `abort` and `finish` may be called at any point of that loop.
"""

from __future__ import annotations

import bisect
import dataclasses
import operator
import time
from collections.abc import Iterable, Mapping

from jaxinfer.errors import RequestError
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.scheduler.block_manager import BlockManager, BlockManagerMetrics
from jaxinfer.scheduler.request import FinishReason, Sequence, SequenceStatus


@dataclasses.dataclass(frozen=True)
class ScheduledSequence:
    """One sequence's share of a step: positions `start_position .. + num_new_tokens - 1`."""

    seq: Sequence
    start_position: int
    num_new_tokens: int
    # 0 for a prefill chunk that stops short of the last known token, n for a fork, else 1.
    num_samples: int
    # Snapshot after this step's allocations, so the runner is unaffected by a concurrent abort.
    block_table: tuple[int, ...]

    @property
    def token_ids(self) -> list[int]:
        """The tokens this step computes (valid until `update`)."""
        return self.seq.token_ids[self.start_position:self.start_position + self.num_new_tokens]


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledSequence, ...]  # decodes first, then prefill chunks
    block_copies: tuple[tuple[int, int], ...]  # (src, dst) physical blocks, before any K/V write
    preempted: tuple[Sequence, ...]
    failed: tuple[Sequence, ...]  # finished by the scheduler this step (see `Sequence.error`)
    num_steps: int = 1  # model steps of the call; > 1 only when every entry decodes one token

    def model_step(self, index: int) -> SchedulerOutput:
        """Model step `index` of the call as a single step: each entry one position further."""
        if index == 0:
            return self
        return SchedulerOutput(tuple(dataclasses.replace(e, start_position=e.start_position + index)
                                     for e in self.scheduled), (), (), ())

    @property
    def num_batched_tokens(self) -> int:
        return sum(entry.num_new_tokens for entry in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclasses.dataclass(frozen=True)
class SchedulerMetrics:
    num_running: int  # sequences
    num_waiting: int  # sequences
    num_preemptions: int  # since start
    blocks: BlockManagerMetrics


class _StepBuilder:
    """The batch being assembled by one `schedule()` call."""

    def __init__(self, token_budget: int):
        self.token_budget = token_budget
        self.scheduled: list[ScheduledSequence] = []
        self.block_copies: dict[int, list[tuple[int, int]]] = {}  # by id(seq), for the scheduled
        self.preempted: list[Sequence] = []
        self.failed: list[Sequence] = []

    def add(self, seq: Sequence, start_position: int, num_new_tokens: int,
            block_copies: list[tuple[int, int]]) -> None:
        reaches_end = start_position + num_new_tokens == seq.num_tokens
        self.scheduled.append(ScheduledSequence(seq, start_position, num_new_tokens,
                                                seq.fanout if reaches_end else 0,
                                                tuple(seq.block_table)))
        self.block_copies[id(seq)] = block_copies
        self.token_budget -= num_new_tokens

    def remove(self, seq: Sequence) -> None:
        """Takes a scheduled sequence out of the step: its tokens back into the budget, and its
        copies dropped (their destination blocks are freed with it, and may be handed out again)."""
        entry = next(e for e in self.scheduled if e.seq is seq)
        self.scheduled.remove(entry)
        del self.block_copies[id(seq)]
        self.token_budget += entry.num_new_tokens

    def output(self, num_steps: int) -> SchedulerOutput:
        copies = tuple(pair for entry in self.scheduled for pair in self.block_copies[id(entry.seq)])
        return SchedulerOutput(tuple(self.scheduled), copies, tuple(self.preempted), tuple(self.failed), num_steps)


def _waiting_key(seq: Sequence) -> tuple:
    # Preempted sequences go back to the front of their priority class.
    return (seq.priority, seq.num_preemptions == 0) + seq.rank[1:]


class Scheduler:
    """FCFS-with-priority continuous-batching scheduler over a `BlockManager`.

    `eos_token_ids` are the model's end-of-sequence tokens (several for some chat models); they
    finish a sequence with reason "stop" unless its SamplingParams set `ignore_eos`.
    `decode_steps` and `decode_call_tokens` bound multi-step decode (see the module docstring).
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, enable_chunked_prefill: bool = True,
                 eos_token_ids: Iterable[int] = (), decode_steps: int = 1, decode_call_tokens: int = 1):
        for name, value in (("max_num_seqs", max_num_seqs),
                            ("max_num_batched_tokens", max_num_batched_tokens),
                            ("max_model_len", max_model_len), ("decode_steps", decode_steps),
                            ("decode_call_tokens", decode_call_tokens)):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if not enable_chunked_prefill and max_num_batched_tokens < max_model_len:
            raise ValueError(
                f"max_num_batched_tokens={max_num_batched_tokens} < max_model_len={max_model_len}: "
                "without chunked prefill a whole prompt must fit in one step; enable chunked "
                "prefill or raise max_num_batched_tokens")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.decode_steps = decode_steps
        self.decode_call_tokens = decode_call_tokens
        self._running: list[Sequence] = []  # sorted by rank
        self._waiting: list[Sequence] = []  # sorted by _waiting_key
        self._live: dict[str, list[Sequence]] = {}  # unfinished sequences per request
        self._num_arrivals = 0
        self._num_preemptions = 0

    @property
    def running(self) -> tuple[Sequence, ...]:
        return tuple(self._running)

    @property
    def waiting(self) -> tuple[Sequence, ...]:
        return tuple(self._waiting)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._live)

    def add_request(self, request_id: str, prompt_token_ids: Iterable[int],
                    sampling_params: SamplingParams | None = None, priority: int = 0,
                    arrival_time: float | None = None) -> Sequence:
        """Queues a request; lower `priority` values are served first, ties by arrival time."""
        prompt = [operator.index(t) for t in prompt_token_ids]
        params = sampling_params or SamplingParams()
        if request_id in self._live:
            raise RequestError(f"request id {request_id!r} is already in use; give each request a unique id")
        if not prompt:
            raise RequestError(f"request {request_id!r} has an empty prompt; it needs at least one token")
        if len(prompt) > self.max_model_len:
            raise RequestError(
                f"request {request_id!r}: the prompt has {len(prompt)} tokens but max_model_len is "
                f"{self.max_model_len}; shorten the prompt or use an engine with a larger max_model_len")
        bm = self.block_manager
        if bm.blocks_needed(len(prompt)) > bm.num_usable_blocks:
            raise RequestError(
                f"request {request_id!r}: the prompt has {len(prompt)} tokens but the KV cache holds "
                f"only {bm.num_usable_blocks * bm.block_size}; shorten the prompt or give the cache more blocks")
        if params.n > self.max_num_seqs:
            raise RequestError(
                f"request {request_id!r} asks for n={params.n} samples but max_num_seqs is "
                f"{self.max_num_seqs}; lower n or raise max_num_seqs")
        seq = Sequence(request_id, 0, prompt, params, priority,
                       time.monotonic() if arrival_time is None else arrival_time, self._num_arrivals)
        self._num_arrivals += 1
        bisect.insort(self._waiting, seq, key=_waiting_key)
        self._live[request_id] = [seq]
        return seq

    def abort(self, request_id: str) -> list[Sequence]:
        """Finishes every sequence of the request with reason "abort" and frees its blocks now.

        Returns the sequences it finished (none when the request is unknown or already done).
        """
        seqs = list(self._live.get(request_id, ()))
        for seq in seqs:
            self.finish(seq, "abort")
        return seqs

    def finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        """Ends a sequence (e.g. on a stop string the engine found) and frees its blocks now."""
        if seq.is_finished:
            return
        queue = self._running if seq.status is SequenceStatus.RUNNING else self._waiting
        queue.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.error = error
        live = self._live[seq.request_id]
        live.remove(seq)
        if not live:
            del self._live[seq.request_id]

    def schedule(self) -> SchedulerOutput:
        step = _StepBuilder(self.max_num_batched_tokens)
        decodes = [seq for seq in self._running if seq.num_tokens - seq.num_computed_tokens == 1]
        prefills = [seq for seq in self._running if seq.num_tokens - seq.num_computed_tokens > 1]
        for seq in decodes + prefills:
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = self._chunk_size(seq.num_tokens - seq.num_computed_tokens, step.token_budget)
            if not num_new:
                continue
            start = seq.num_computed_tokens
            block_copies = self._allocate_or_preempt(seq, num_new, step)
            if block_copies is not None:
                step.add(seq, start, num_new, block_copies)
        if not step.preempted:
            self._admit_waiting(step)
        return step.output(self._extend_decodes(step))

    def update(self, output: SchedulerOutput,
               sampled_token_ids: list | Mapping[tuple[str, int], object]) -> list[Sequence]:
        """Records a finished step and returns the sequences that got tokens or finished.

        `sampled_token_ids` is aligned with `output.scheduled` (a list) or keyed by `seq.seq_id`
        (a dict); an entry with `num_samples == k` needs an int (k == 1) or k ints, entries that
        sample nothing are ignored. Finished sequences free their blocks before this returns.
        """
        changed = []
        for entry, tokens in zip(output.scheduled, self._sampled_per_entry(output, sampled_token_ids)):
            seq = entry.seq
            if seq.status is not SequenceStatus.RUNNING:  # aborted or finished during the step
                continue
            seq.num_computed_tokens = entry.start_position + entry.num_new_tokens
            self.block_manager.cache_computed_blocks(seq, entry.start_position)
            if not tokens:
                continue
            family = [seq] + [self._fork(seq, index) for index in range(1, len(tokens))]
            for member, token in zip(family, tokens):
                member.append_token(token)
                changed.append(member)
                reason = self._stop_reason(member)
                if reason:
                    self.finish(member, reason)
        return changed

    def metrics(self) -> SchedulerMetrics:
        return SchedulerMetrics(len(self._running), len(self._waiting), self._num_preemptions,
                                self.block_manager.metrics())

    def _chunk_size(self, num_remaining: int, token_budget: int) -> int:
        """Tokens to compute now: all, a chunk of them, or 0 when they must wait for a later step."""
        if self.enable_chunked_prefill:
            return min(num_remaining, token_budget)
        return num_remaining if num_remaining <= token_budget else 0

    def _allocate_or_preempt(self, seq: Sequence, num_new: int,
                             step: _StepBuilder) -> list[tuple[int, int]] | None:
        """Slots for `seq`'s next tokens, preempting the lowest-ranked running sequences as needed
        (taking them out of the step if they were scheduled in it).

        Returns the block copies, or None when `seq` itself was preempted or failed.
        """
        while (block_copies := self.block_manager.allocate_slots(seq, num_new)) is None:
            victim = self._running[-1]
            if victim is seq and len(self._running) == 1:
                self._fail_oversized(seq, seq.num_computed_tokens + num_new, step)
                return None
            if id(victim) in step.block_copies:
                step.remove(victim)
            self._preempt(victim, step)
            if victim is seq:
                return None
        return block_copies

    def _extend_decodes(self, step: _StepBuilder) -> int:
        """The model steps of this call: when every entry decodes one token and the free blocks
        hold the slots of all the steps ahead, as many as the bounds allow (their slots allocated
        now, the entries' block tables updated), else 1."""
        entries = step.scheduled
        if self.decode_steps == 1 or not entries or step.preempted or any(
                e.num_new_tokens != 1 or e.num_samples != 1 for e in entries):
            return 1
        num_steps = min(self.decode_steps, max(1, self.decode_call_tokens // len(entries)))
        for entry in entries:
            seq, params = entry.seq, entry.seq.sampling_params
            num_steps = min(num_steps, params.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens)
            if seq.num_output_tokens < params.min_tokens:
                num_steps = min(num_steps, params.min_tokens - seq.num_output_tokens)
        bm = self.block_manager
        num_fresh = sum(max(0, bm.blocks_needed(e.seq.num_computed_tokens + num_steps) - len(e.seq.block_table))
                        for e in entries)
        if num_steps <= 1 or num_fresh > bm.num_free_blocks:
            return 1
        for i, entry in enumerate(entries):
            # The first step's allocation made the entry's blocks private: this only appends fresh ones.
            copies = bm.allocate_slots(entry.seq, num_steps)
            assert copies == [], f"extending {entry.seq!r} needed block copies {copies}"
            entries[i] = dataclasses.replace(entry, block_table=tuple(entry.seq.block_table))
        return num_steps

    def _admit_waiting(self, step: _StepBuilder) -> None:
        bm = self.block_manager
        num_seq_slots = sum(seq.fanout for seq in self._running)
        for seq in list(self._waiting):
            if not step.token_budget or num_seq_slots + seq.fanout > self.max_num_seqs:
                return
            cached_blocks = bm.find_cached_prefix(seq)
            num_new = self._chunk_size(seq.num_tokens - len(cached_blocks) * bm.block_size,
                                       step.token_budget)
            if not num_new:
                return
            if not bm.admit(seq, cached_blocks, num_new):
                if self._running:
                    return
                self._fail_oversized(seq, len(cached_blocks) * bm.block_size + num_new, step)
                continue
            self._waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            if not seq.num_preemptions:
                seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            bisect.insort(self._running, seq, key=operator.attrgetter("rank"))
            num_seq_slots += seq.fanout
            step.add(seq, seq.num_computed_tokens, num_new, [])

    def _preempt(self, seq: Sequence, step: _StepBuilder) -> None:
        self._running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self._num_preemptions += 1
        bisect.insort(self._waiting, seq, key=_waiting_key)
        step.preempted.append(seq)

    def _fail_oversized(self, seq: Sequence, num_tokens: int, step: _StepBuilder) -> None:
        bm = self.block_manager
        self.finish(seq, "abort", error=(
            f"request {seq.request_id!r} needs {bm.blocks_needed(num_tokens)} KV cache blocks for "
            f"{num_tokens} tokens (block_size {bm.block_size}) but the pool has only "
            f"{bm.num_usable_blocks}; give the KV cache more blocks or lower max_tokens"))
        step.failed.append(seq)

    def _fork(self, parent: Sequence, seq_index: int) -> Sequence:
        child = parent.fork(seq_index)
        self.block_manager.fork(parent, child)
        bisect.insort(self._running, child, key=operator.attrgetter("rank"))
        self._live[parent.request_id].append(child)
        return child

    def _stop_reason(self, seq: Sequence) -> FinishReason | None:
        params = seq.sampling_params
        token = seq.token_ids[-1]
        is_stop_token = token in params.stop_token_ids or (
            not params.ignore_eos and token in self.eos_token_ids)
        if is_stop_token and seq.num_output_tokens >= params.min_tokens:
            return "stop"
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _sampled_per_entry(self, output: SchedulerOutput, sampled_token_ids) -> list[list[int]]:
        """The sampled tokens of each scheduled entry as a list of ints ([] when it samples nothing)."""
        entries = output.scheduled
        if isinstance(sampled_token_ids, Mapping):
            values = [sampled_token_ids.get(entry.seq.seq_id) for entry in entries]
        else:
            values = list(sampled_token_ids)
            if len(values) != len(entries):
                raise ValueError(f"got {len(values)} sampled entries for {len(entries)} scheduled "
                                 "sequences; pass one per scheduled sequence (or a dict by seq_id)")
        return [_as_token_list(entry, value) if entry.num_samples else []
                for entry, value in zip(entries, values)]


def _as_token_list(entry: ScheduledSequence, value) -> list[int]:
    if value is None:
        raise ValueError(f"no sampled token for {entry.seq!r}, which samples {entry.num_samples} this step")
    try:
        tokens = [operator.index(value)]
    except TypeError:
        tokens = [operator.index(t) for t in value]
    if len(tokens) != entry.num_samples:
        raise ValueError(f"{entry.seq!r} samples {entry.num_samples} tokens this step, got {len(tokens)}")
    return tokens
