"""Serving metrics (TTFT, TPOT, ITL, percentiles, goodput), arrival schedules and workloads,
checked against plain-Python recomputations on random synthetic timings."""

import json

import numpy as np
import pytest

from jaxinfer.bench.arrivals import arrival_offsets
from jaxinfer.bench.dataset import (BenchRequest, DatasetFile, LengthRange, dataset_requests, random_requests,
                                    refuse_oversized)
from jaxinfer.bench.engine_runs import KVUsage
from jaxinfer.bench.latency import all_decoding_rate
from jaxinfer.bench.metrics import RequestTiming, parse_slo, run_metrics, summarize
from jaxinfer.bench.results import comparison_table
from jaxinfer.bench.runs import SERVE_COLUMNS, SLO_COLUMNS
from jaxinfer.errors import RequestError
from jaxinfer.scheduler.block_manager import BlockManagerMetrics
from jaxinfer.scheduler.scheduler import SchedulerMetrics


def percentile_oracle(values, q):
    """Linear interpolation between closest ranks, written out."""
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def random_timings(rng, count):
    timings = []
    for _ in range(count):
        timing = RequestTiming(arrival=float(rng.uniform(0, 10)), num_prompt_tokens=int(rng.integers(1, 100)))
        now = timing.arrival
        for _ in range(int(rng.integers(1, 20))):
            now += float(rng.exponential(0.05))
            timing.add_chunk(now, int(rng.integers(1, 3)))
        timings.append(timing)
    return timings


def test_summary_percentiles_match_oracle():
    rng = np.random.default_rng(0)
    values = list(rng.exponential(1.0, size=int(rng.integers(5, 200))))
    summary = summarize(values)
    assert summary["mean"] == pytest.approx(sum(values) / len(values))
    assert summary["median"] == pytest.approx(percentile_oracle(values, 50))
    assert summary["p90"] == pytest.approx(percentile_oracle(values, 90))
    assert summary["p99"] == pytest.approx(percentile_oracle(values, 99))
    assert summarize([]) == {"count": 0}


def test_request_metrics_follow_their_definitions():
    rng = np.random.default_rng(1)
    for timing in random_timings(rng, 50):
        tokens = timing.num_output_tokens
        assert timing.ttft == timing.chunk_times[0] - timing.arrival
        assert timing.e2e == timing.chunk_times[-1] - timing.arrival
        expected_tpot = (timing.e2e - timing.ttft) / (tokens - 1) if tokens > 1 else None
        assert timing.tpot == (pytest.approx(expected_tpot) if expected_tpot is not None else None)
        gaps = [b - a for a, b in zip(timing.chunk_times, timing.chunk_times[1:])]
        assert timing.itls == pytest.approx(gaps)


def test_all_decoding_rate_counts_the_steps_where_every_request_decodes():
    """One request: 1 / TPOT. Two in lockstep, the second's first token 3 steps after the first's: only
    the steps after that and up to the first one's last count; a first request that finishes before
    the second starts is refused."""
    rng = np.random.default_rng(5)
    alone = RequestTiming(arrival=0.0, num_prompt_tokens=10)
    alone.add_chunk(0.5, 1)
    for now in np.cumsum(rng.uniform(0.01, 0.1, 12)) + 0.5:
        alone.add_chunk(float(now), 4)
    assert all_decoding_rate([alone]) == pytest.approx(1 / alone.tpot)

    steps = np.cumsum(rng.uniform(0.01, 0.1, 14))
    first, second = (RequestTiming(arrival=0.0, num_prompt_tokens=10) for _ in range(2))
    for step, now in enumerate(steps):
        if step <= 10:
            first.add_chunk(float(now), 1 if step == 0 else 4)
        if step >= 3:
            second.add_chunk(float(now), 1 if step == 3 else 4)
    assert all_decoding_rate([first, second]) == pytest.approx(7 * 2 * 4 / (steps[10] - steps[3]))

    late = RequestTiming(arrival=0.0, num_prompt_tokens=10)
    late.add_chunk(float(steps[12]), 1)
    late.add_chunk(float(steps[13]), 4)
    with pytest.raises(RequestError, match="--decode-tokens"):
        all_decoding_rate([first, late])


def test_run_metrics_throughput_and_goodput():
    rng = np.random.default_rng(2)
    timings = random_timings(rng, 80)
    slo = parse_slo("ttft=60ms, tpot=0.08")
    assert slo == {"ttft": pytest.approx(0.06), "tpot": 0.08}
    metrics = run_metrics(timings, duration=12.5, slo=slo)
    outputs = sum(sum(t.chunk_tokens) for t in timings)
    assert metrics["output_tokens_per_s"] == pytest.approx(outputs / 12.5)
    assert metrics["requests_per_s"] == pytest.approx(80 / 12.5)
    good = [t for t in timings if t.ttft <= 0.06 and (t.tpot is None or t.tpot <= 0.08)]
    assert 0 < len(good) < len(timings)
    assert metrics["goodput_requests_per_s"] == pytest.approx(len(good) / 12.5)
    table = comparison_table({"jaxinfer": metrics}, SERVE_COLUMNS + SLO_COLUMNS, reference="jaxinfer")
    header, row = table.splitlines()[:2]
    assert "goodput requests/s" in header and row.split()[-2:] == [f"{len(good) / 12.5:.2f}", f"{len(good) / 80:.2f}"]
    assert metrics["ttft_s"]["p99"] == pytest.approx(percentile_oracle([t.ttft for t in timings], 99))


def test_failed_requests_are_counted_and_left_out_of_the_figures():
    rng = np.random.default_rng(4)
    completed = random_timings(rng, 30)
    failed = random_timings(rng, 7)  # a failure may come after some chunks (a stream broken off)
    for i, timing in enumerate(failed):
        timing.error = "RESOURCE_EXHAUSTED: queue full" if i % 3 else "CANCELLED: server stopping"
    mixed = completed + failed
    rng.shuffle(mixed)
    metrics = run_metrics(mixed, duration=4.0, slo={"ttft": 10.0})
    alone = run_metrics(completed, duration=4.0, slo={"ttft": 10.0})
    assert metrics["num_requests"] == 30 and metrics["failed_requests"] == 7
    assert metrics["errors"] == {"RESOURCE_EXHAUSTED: queue full": 4, "CANCELLED: server stopping": 3}
    for key in ("output_tokens_per_s", "input_tokens_per_s", "requests_per_s", "ttft_s", "tpot_s", "itl_s", "e2e_s",
                "goodput_requests_per_s"):
        assert metrics[key] == alone[key], key
    assert metrics["slo_attainment"] == pytest.approx(30 / 37) and alone["slo_attainment"] == 1.0
    refused = RequestTiming(arrival=min(t.arrival for t in mixed) + 1.0, num_prompt_tokens=5, error="INTERNAL: x")
    records = run_metrics(mixed + [refused], duration=4.0, detailed=True)["requests"]
    assert len(records) == 38 and "requests" not in metrics
    assert records[-1] == {"sent_s": 1.0, "prompt_tokens": 5, "output_tokens": 0, "cached_tokens": 0, "ttft_s": None,
                           "tpot_s": None, "e2e_s": None, "itls_s": [], "error": "INTERNAL: x"}
    assert [r["ttft_s"] for r in records[:-1]] == [t.ttft for t in mixed]
    silent = RequestTiming(arrival=0.0, num_prompt_tokens=5)  # ended without a token or an error
    with_silent = run_metrics(mixed + [silent], duration=4.0)
    assert with_silent["failed_requests"] == 8 and with_silent["errors"]["no token came back"] == 1


class _Stream:
    """A fake Jaxinfer stub whose Generate streams `responses` (jaxinfer_pb2.GenerateResponse)."""

    def __init__(self, responses):
        self.responses = responses

    def Generate(self, request, metadata):
        async def stream():
            for response in self.responses:
                yield response
        return stream()


@pytest.mark.parametrize("tokens, reason, error", [
    ([[3, 4], [5]], "FINISH_REASON_LENGTH", None),
    ([[3, 4]], "FINISH_REASON_ABORT", "ended after 2 of 3 tokens (FINISH_REASON_ABORT)"),
    ([], "FINISH_REASON_ABORT", "ended after 0 of 3 tokens (FINISH_REASON_ABORT)"),
    ([[3]], None, "ended after 1 of 3 tokens (no finished response)")])
def test_a_stream_the_server_ends_early_is_a_failed_request(tokens, reason, error):
    import asyncio

    from jaxinfer.bench.grpc_load import _stream
    from serving.protos import jaxinfer_pb2 as pb

    responses = [pb.GenerateResponse(outputs=[pb.Completion(token_ids=ids)]) for ids in tokens]
    if reason is not None:
        responses.append(pb.GenerateResponse(finished=True, outputs=[pb.Completion(finish_reason=reason)]))
    timing = RequestTiming(0.0, 4)
    asyncio.run(_stream(_Stream(responses), (), BenchRequest((1, 2, 3, 4), 3), None, timing))
    assert timing.error == error and timing.num_output_tokens == sum(map(len, tokens))
    assert run_metrics([timing], 1.0)["failed_requests"] == (error is not None)


@pytest.mark.parametrize("text", ["ttft", "ttft=fast", "latency=3", "tpot=-1"])
def test_bad_slo_is_refused(text):
    with pytest.raises(RequestError, match="SLO"):
        parse_slo(text)


def test_arrivals_have_the_requested_rate_and_shape():
    for burstiness in (0.5, 1.0, 4.0):
        offsets = arrival_offsets(20000, rate=8.0, burstiness=burstiness, seed=3)
        gaps = np.diff(offsets)
        assert offsets[0] == 0 and (gaps >= 0).all()
        assert gaps.mean() == pytest.approx(1 / 8.0, rel=0.03)
        # A gamma distribution's coefficient of variation is 1 / sqrt(shape).
        assert gaps.std() / gaps.mean() == pytest.approx(1 / np.sqrt(burstiness), rel=0.05)
    assert (arrival_offsets(5, rate=float("inf"), burstiness=1.0, seed=0) == 0).all()
    np.testing.assert_array_equal(arrival_offsets(50, 2.0, 1.0, seed=9), arrival_offsets(50, 2.0, 1.0, seed=9))


def test_random_workload_is_deterministic_and_in_range():
    first = random_requests(64, LengthRange(16, 512), LengthRange.parse("16:256"), vocab_size=1000, seed=5)
    assert first == random_requests(64, LengthRange(16, 512), LengthRange(16, 256), vocab_size=1000, seed=5)
    assert first != random_requests(64, LengthRange(16, 512), LengthRange(16, 256), vocab_size=1000, seed=6)
    assert all(16 <= len(r.prompt_token_ids) <= 512 and 16 <= r.max_tokens <= 256 for r in first)
    assert all(0 <= t < 1000 for r in first for t in r.prompt_token_ids)
    assert len({len(r.prompt_token_ids) for r in first}) > 20


def test_shared_prefixes_lead_the_prompts_and_keep_the_rest_of_the_workload():
    plain = random_requests(30, LengthRange(4, 50), LengthRange(1, 9), vocab_size=1000, seed=7)
    shared = random_requests(30, LengthRange(4, 50), LengthRange(1, 9), vocab_size=1000, seed=7, prefix_len=24,
                             num_prefixes=3)
    prefixes = [shared[i].prompt_token_ids[:24] for i in range(3)]
    assert len(set(prefixes)) == 3 and all(0 <= t < 1000 for p in prefixes for t in p)
    for i, (p, s) in enumerate(zip(plain, shared)):
        assert s.prompt_token_ids == prefixes[i % 3] + p.prompt_token_ids and s.max_tokens == p.max_tokens
    assert random_requests(30, LengthRange(4, 50), LengthRange(1, 9), 1000, seed=8, prefix_len=24)[0] != shared[0]


def test_length_range_parsing():
    assert LengthRange.parse("7") == LengthRange(7, 7)
    for bad in ("0", "9:3", "a:b", "1:2:3"):
        with pytest.raises(RequestError):
            LengthRange.parse(bad)


def test_requests_that_exceed_max_model_len_are_refused_before_measuring():
    requests = random_requests(40, LengthRange(16, 512), LengthRange(16, 256), vocab_size=1000, seed=8)
    refuse_oversized(requests, max_model_len=768)
    too_long = [i for i, r in enumerate(requests) if len(r.prompt_token_ids) + r.max_tokens > 500]
    assert 0 < len(too_long) < len(requests)
    first = requests[too_long[0]]
    with pytest.raises(RequestError, match=f"^{len(too_long)} of 40 requests exceed the engine's max_model_len \\(500 "
                                           f"tokens of prompt plus output; request {too_long[0]}: "
                                           f"{len(first.prompt_token_ids)} \\+ {first.max_tokens}\\)"):
        refuse_oversized(requests, max_model_len=500)


def _ord_encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_jsonl_workload(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in [
        {"prompt": "ab"}, {"prompt_token_ids": [5, 6, 7], "max_tokens": 3}, {"prompt": "cde"}]) + "\n\n")
    sample = dataset_requests(DatasetFile.read(path), _ord_encode, default_max_tokens=9, num_requests=2, seed=0,
                              max_model_len=100)
    assert [(r.prompt_token_ids, r.max_tokens) for r in sample.requests] == [((97, 98), 9), ((5, 6, 7), 3)]
    assert sample.skipped == 0
    for text, where in [('{"text": "no prompt"}\n', "prompts.jsonl:1"),
                        ('{"prompt": "a"}\n{"prompt": \n', "prompts.jsonl:2 is not JSON"),
                        ('{"prompt": "a", "max_tokens": "many"}\n', "prompts.jsonl:1")]:
        path.write_text(text)
        with pytest.raises(RequestError, match=where):
            dataset_requests(DatasetFile.read(path), list, default_max_tokens=1, num_requests=4, seed=0,
                             max_model_len=100)


def _conversations(rng: np.random.Generator, count: int) -> list[dict]:
    """ShareGPT rows of random text: some with one turn, some with a 1-3 character prompt or reply,
    some long; a third turn that must be ignored."""
    def text(n):
        return "".join(chr(c) for c in rng.integers(ord("a"), ord("z") + 1, size=n))
    rows = []
    for _ in range(count):
        turns = [{"from": "human", "value": text(int(rng.integers(1, 60)))},
                 {"from": "gpt", "value": text(int(rng.integers(1, 60)))},
                 {"from": "human", "value": text(500)}][:int(rng.choice([1, 2, 3], p=[0.15, 0.6, 0.25]))]
        rows.append({"id": text(5), "conversations": turns})
    return rows


def test_sharegpt_workload_draws_conversations_by_seed_and_skips_as_vllm_does(tmp_path):
    rows = _conversations(np.random.default_rng(), 40)
    max_model_len = 80
    usable = {i: (tuple(_ord_encode(row["conversations"][0]["value"])), len(row["conversations"][1]["value"]))
              for i, row in enumerate(rows) if len(row["conversations"]) >= 2
              and min(len(row["conversations"][0]["value"]), len(row["conversations"][1]["value"])) >= 4
              and len(row["conversations"][0]["value"]) + len(row["conversations"][1]["value"]) <= max_model_len}
    assert 0 < len(usable) < len(rows)
    as_list, as_lines = tmp_path / "sharegpt.json", tmp_path / "sharegpt.jsonl"
    as_list.write_text(json.dumps(rows))
    as_lines.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for path in (as_list, as_lines):
        sample = dataset_requests(DatasetFile.read(path), _ord_encode, default_max_tokens=7, num_requests=1000, seed=3,
                                  max_model_len=max_model_len)
        order = [i for i in np.random.default_rng(3).permutation(len(rows)) if i in usable]
        assert [(r.prompt_token_ids, r.max_tokens) for r in sample.requests] == [usable[i] for i in order]
        assert sample.skipped == len(rows) - len(usable)
    other_seed = dataset_requests(DatasetFile.read(as_list), _ord_encode, 7, 1000, seed=4,
                                  max_model_len=max_model_len).requests
    assert sorted(other_seed, key=hash) == sorted(sample.requests, key=hash) and other_seed != sample.requests
    calls = []
    first_two = dataset_requests(DatasetFile.read(as_list), lambda text: calls.append(text) or _ord_encode(text), 7,
                                 num_requests=2, seed=3, max_model_len=max_model_len)
    assert first_two.requests == sample.requests[:2]
    assert len(calls) < 2 * len(rows), "conversations were tokenized beyond the two requests asked for"


def test_sharegpt_files_that_cannot_serve_are_refused_by_place(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "a question here"},
                                                   {"from": "gpt", "value": "an answer here"}]},
                                {"conversations": [{"from": "human", "text": "no value"}]}]))
    with pytest.raises(RequestError, match=r"sharegpt.json\[1\] is not a ShareGPT conversation"):
        dataset_requests(DatasetFile.read(path), _ord_encode, 7, num_requests=5, seed=0, max_model_len=100)
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "a question here"},
                                                   {"from": "gpt", "value": "an answer here"}]},
                                {"conversations": [{"from": "human", "value": "one turn alone"}]}]))
    sample = dataset_requests(DatasetFile.read(path), _ord_encode, 7, num_requests=1, seed=1, max_model_len=29)
    assert len(sample.requests) == 1
    with pytest.raises(RequestError, match=r"none of the 2 ShareGPT conversations .* max_model_len \(28\)"):
        dataset_requests(DatasetFile.read(path), _ord_encode, 7, num_requests=1, seed=1, max_model_len=28)


def test_kv_usage_sums_the_pool_over_a_runs_steps():
    def metrics(used: int, unfilled: int, running: int, preemptions: int) -> SchedulerMetrics:
        blocks = BlockManagerMetrics(block_size=16, num_blocks=100, num_used_blocks=used, num_free_blocks=100 - used,
                                     num_cached_blocks=0, num_unfilled_slots=unfilled, prefix_cache_queries=0,
                                     prefix_cache_hits=0)
        return SchedulerMetrics(num_running=running, num_waiting=0, num_preemptions=preemptions, blocks=blocks)

    usage = KVUsage(metrics(used=0, unfilled=0, running=0, preemptions=3))
    for step in [metrics(10, 40, 2, 3), metrics(30, 20, 5, 4), metrics(20, 60, 4, 5)]:
        usage.record(step)
    assert usage.summary() == {"num_blocks": 100, "block_size": 16, "peak_usage": 0.30, "mean_usage": 0.20,
                               "unfilled_slot_fraction": 120 / (60 * 16), "peak_running_sequences": 5,
                               "preemptions": 2}
