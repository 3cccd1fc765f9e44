"""Static versus continuous batching through the bench driver, on a tiny checkpoint.

Oracles are the definitions: every request yields exactly its max_tokens; static batches of B
(in arrival order) never overlap in time and are rectangles (left-padded prompts, the longest
output for all); continuous batching starts a waiting request before
the longest member of the first full batch finishes, and needs fewer engine steps; with timed
arrivals no request produces a token before it arrived.
"""

import json

import pytest

from conftest import CHECKPOINTS_DIR
from jaxinfer.bench.arrivals import arrival_offsets
from jaxinfer.bench.dataset import LengthRange, fresh_prefixes, random_requests
from jaxinfer.bench.engine_runs import KVUsage, drive, static_rectangle
from jaxinfer.bench.metrics import run_metrics
from jaxinfer.engine.create import create_engine
from jaxinfer.errors import RequestError

MAX_NUM_SEQS = 8


@pytest.fixture(scope="module")
def engine():
    return create_engine(CHECKPOINTS_DIR / "tiny-llama3", progress=False, dtype="float32",
                         max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=64, max_model_len=256, kv_memory="8MiB")


@pytest.fixture(scope="module")
def requests(engine):
    return random_requests(12, LengthRange(4, 40), LengthRange(2, 24), engine.model_cfg.vocab_size, seed=11)


def test_static_batches_wait_for_their_longest_member(engine, requests, monkeypatch):
    batch = 4
    generated = []
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: [generated.append(len(o.outputs[0].delta_token_ids)) or o
                                                 for o in step()])
    steps_before = engine.num_steps
    timings, _ = drive(engine, fresh_prefixes(requests, 1, engine.model_cfg.vocab_size), [0.0] * 12, static_batch=batch)
    static_steps = engine.num_steps - steps_before
    assert [t.num_output_tokens for t in timings] == [r.max_tokens for r in requests]
    groups = [timings[i:i + batch] for i in range(0, len(timings), batch)]
    for earlier, later in zip(groups, groups[1:]):
        assert max(t.chunk_times[-1] for t in earlier) <= min(t.chunk_times[0] for t in later)
    # Each batch decodes for its longest member: every member generates that many tokens.
    longest = [max(r.max_tokens for r in requests[i:i + batch]) for i in range(0, 12, batch)]
    assert static_steps >= sum(longest) and sum(generated) == batch * sum(longest)
    monkeypatch.undo()

    steps_before = engine.num_steps
    timings, duration = drive(engine, fresh_prefixes(requests, 2, engine.model_cfg.vocab_size), [0.0] * 12)
    continuous_steps = engine.num_steps - steps_before
    assert [t.num_output_tokens for t in timings] == [r.max_tokens for r in requests]
    first_full_batch, waiting = timings[:MAX_NUM_SEQS], timings[MAX_NUM_SEQS:]
    assert min(t.chunk_times[0] for t in waiting) < max(t.chunk_times[-1] for t in first_full_batch)
    assert continuous_steps < static_steps
    metrics = run_metrics(timings, duration)
    assert metrics["output_tokens"] == sum(r.max_tokens for r in requests)
    assert not engine.has_unfinished_requests()


def test_static_rectangle_pads_prompts_left_and_outputs_to_the_longest(requests):
    batch = requests[:5]
    padded = static_rectangle(batch)
    longest_prompt = max(len(r.prompt_token_ids) for r in batch)
    for original, rect in zip(batch, padded):
        pad = longest_prompt - len(original.prompt_token_ids)
        assert len(rect.prompt_token_ids) == longest_prompt
        assert rect.prompt_token_ids[pad:] == tuple(original.prompt_token_ids)
        assert set(rect.prompt_token_ids[:pad]) <= {original.prompt_token_ids[0]}
        assert rect.max_tokens == max(r.max_tokens for r in batch)


def test_timed_arrivals_are_respected(engine, requests):
    offsets = arrival_offsets(len(requests), rate=200.0, burstiness=1.0, seed=4)
    timings, duration = drive(engine, fresh_prefixes(requests, 3, engine.model_cfg.vocab_size), offsets)
    start = timings[0].arrival
    assert [t.arrival - start for t in timings] == pytest.approx(list(offsets))
    assert all(t.ttft > 0 and t.num_output_tokens == r.max_tokens for t, r in zip(timings, requests))
    assert duration >= offsets[-1]


def test_shared_prefixes_are_served_from_the_prefix_cache_and_reported(engine, monkeypatch, tmp_path, capsys):
    from jaxinfer.bench import runs
    from jaxinfer.cli import _parser

    prefix_len, block = 40, engine.engine_cfg.block_size
    monkeypatch.setattr(runs, "_engine", lambda args: engine)
    output = tmp_path / "serve.json"
    runs.serve_main(_parser().parse_args([
        "bench", "serve", "--num-requests", "10", "--input-len", "4:12", "--output-len", "3", "--prefix-len",
        str(prefix_len), "--num-prefixes", "2", "--request-rate", "100", "--slo", "ttft=30s", "--save-detailed",
        "--output", str(output)]))
    printed = capsys.readouterr().out.split("request_rate = 100.0\n")[1].splitlines()
    assert "goodput requests/s" in printed[0] and "within SLO" in printed[0] and "prompt tokens cached" in printed[0]
    assert any(line.startswith("KV cache, jaxinfer: peak ") for line in printed)
    results = json.loads(output.read_text())
    assert (results["workload"]["prefix_len"], results["workload"]["num_prefixes"]) == (prefix_len, 2)
    point = results["curves"]["jaxinfer"][0]
    # Each prefix's first request computes it; the later ones that arrive after it find its full blocks.
    assert 0 < point["prefix_cache_hit_rate"] <= 8 * (prefix_len // block * block) / point["input_tokens"]
    assert point["slo_attainment"] == 1.0 and not engine.has_unfinished_requests()
    kv = point["kv_cache"]  # the pool over this point's run
    assert 1 <= kv["peak_running_sequences"] <= MAX_NUM_SEQS and kv["preemptions"] == 0
    assert 0 < kv["mean_usage"] <= kv["peak_usage"] <= 1
    records = point["requests"]  # --save-detailed: the figures above, request by request
    assert [r["output_tokens"] for r in records] == [3] * 10 and all(r["error"] is None for r in records)
    assert sum(r["cached_tokens"] for r in records) / sum(r["prompt_tokens"] for r in records) == \
        point["prefix_cache_hit_rate"]
    ttfts = sorted(r["ttft_s"] for r in records)
    assert (ttfts[4] + ttfts[5]) / 2 == pytest.approx(point["ttft_s"]["median"])
    assert sum(len(r["itls_s"]) for r in records) == point["itl_s"]["count"]
    assert min(r["sent_s"] for r in records) == 0 and max(r["sent_s"] for r in records) > 0


@pytest.mark.parametrize("static_batch", [None, 8])
def test_max_in_flight_holds_arrivals_until_a_request_ends(engine, requests, static_batch):
    limit = 3
    timings, _ = drive(engine, fresh_prefixes(requests, 4, engine.model_cfg.vocab_size), [0.0] * len(requests),
                       static_batch, max_in_flight=limit)
    assert [t.num_output_tokens for t in timings] == [r.max_tokens for r in requests]
    # Each request's clock runs from when it was sent to its last token; at most `limit` run at once.
    events = sorted([(t.arrival, 1) for t in timings] + [(t.chunk_times[-1], -1) for t in timings],
                    key=lambda event: (event[0], event[1]))
    in_flight = [sum(change for _, change in events[:k + 1]) for k in range(len(events))]
    assert max(in_flight) == limit
    later = sorted(timings, key=lambda t: t.arrival)[limit:]
    if static_batch is None:  # each sent when an earlier one ended
        assert [t.arrival for t in later] == sorted(t.chunk_times[-1] for t in timings)[:len(later)]
    else:  # batches of `limit`: a client freed by a finished member waits (timed) for the batch to end
        batches = [sorted(timings, key=lambda t: t.arrival)[i:i + limit] for i in range(0, len(timings), limit)]
        for earlier, batch in zip(batches, batches[1:]):
            assert min(t.arrival for t in batch) >= min(t.chunk_times[-1] for t in earlier)
            assert min(t.chunk_times[0] for t in batch) > max(t.chunk_times[-1] for t in earlier)
    assert not engine.has_unfinished_requests()


def test_sampling_options_reach_every_request(engine, requests, monkeypatch):
    from jaxinfer.bench.grpc_load import generate_request

    seen = []
    add_request = engine.add_request
    monkeypatch.setattr(engine, "add_request", lambda *args, params, **kwargs: seen.append(params) or add_request(
        *args, params=params, **kwargs))
    sampling = {"temperature": 0.8, "top_p": 0.9, "top_k": 5}
    timings, _ = drive(engine, fresh_prefixes(requests, 5, engine.model_cfg.vocab_size), [0.0] * len(requests),
                       sampling=sampling)
    assert [t.num_output_tokens for t in timings] == [r.max_tokens for r in requests]
    assert {(p.temperature, p.top_p, p.top_k, p.ignore_eos) for p in seen} == {(0.8, 0.9, 5, True)}
    sent = generate_request(requests[0], sampling).sampling  # the same options over gRPC
    assert (sent.temperature, sent.top_p, sent.top_k, sent.ignore_eos) == pytest.approx((0.8, 0.9, 5, True))
    assert generate_request(requests[0]).sampling.temperature == 0.0 and len(seen) == len(requests)


def _greedy(engine, requests, tag):
    """Each request's greedy tokens and cached prompt tokens, the requests run one after another
    (so that each later one can find the earlier ones' prefixes)."""
    from jaxinfer.sampling_params import SamplingParams

    results = []
    for i, request in enumerate(requests):
        engine.add_request(f"{tag}{i}", prompt_token_ids=request.prompt_token_ids,
                           params=SamplingParams(temperature=0.0, max_tokens=request.max_tokens, ignore_eos=True))
        while engine.has_unfinished_requests():
            finished = [o for o in engine.step() if o.finished]
        results.append((finished[0].outputs[0].token_ids, finished[0].num_cached_tokens))
    return results


def test_without_the_prefix_cache_nothing_is_cached_and_the_tokens_are_the_same(engine, monkeypatch):
    from jaxinfer.bench import runs
    from jaxinfer.cli import _parser

    # A smaller engine than the module's (fewer buckets to compile); greedy tokens do not depend on the buckets.
    settings = dict(dtype="float32", max_num_seqs=2, max_num_batched_tokens=32, max_model_len=128, kv_memory="4MiB",
                    decode_steps=1)
    created = []
    monkeypatch.setattr(runs, "create_engine", lambda model, **kwargs: created.append(kwargs) or create_engine(
        model, **{**kwargs, **settings, "progress": False}))
    args = _parser().parse_args(["bench", "throughput", str(CHECKPOINTS_DIR / "tiny-llama3"), "--no-prefix-caching"])
    uncached = runs._engine(args)
    assert created[0]["enable_prefix_caching"] is False
    assert runs._engine_config(uncached)["enable_prefix_caching"] is False  # the JSON results say so
    assert runs._engine_config(engine)["enable_prefix_caching"] is True
    requests = random_requests(6, LengthRange(3, 9), LengthRange(4, 4), engine.model_cfg.vocab_size, seed=5,
                               prefix_len=3 * engine.engine_cfg.block_size, num_prefixes=2)
    requests = fresh_prefixes(requests, 7, engine.model_cfg.vocab_size)
    with_cache, without = _greedy(engine, requests, "on"), _greedy(uncached, requests, "off")
    assert [tokens for tokens, _ in with_cache] == [tokens for tokens, _ in without]
    assert sum(cached for _, cached in with_cache) > 0 and sum(cached for _, cached in without) == 0


def test_kv_usage_follows_the_pool_through_a_run(engine, requests, monkeypatch):
    """All 12 requests at once: max_num_seqs of them run together, every engine call is sampled, and
    the blocks in use hold some empty slots (the last block of each sequence) but mostly tokens."""
    usage = KVUsage(engine.scheduler.metrics())
    calls = []
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: calls.append(1) or step())
    drive(engine, fresh_prefixes(requests, 6, engine.model_cfg.vocab_size), [0.0] * len(requests), kv_usage=usage)
    summary = usage.summary()
    assert usage.steps == len(calls)
    assert summary["peak_running_sequences"] == MAX_NUM_SEQS and summary["preemptions"] == 0
    assert 0 < summary["mean_usage"] <= summary["peak_usage"] <= 1
    assert 0 < summary["unfilled_slot_fraction"] < 0.5
    assert engine.scheduler.metrics().blocks.num_used_blocks == 0


def test_latency_puts_each_decode_batch_against_its_roofline(engine, monkeypatch, tmp_path, capsys):
    """A matmul rate that makes the batch-1 step bandwidth-bound and the batch-4 step compute-bound:
    batch 1's prediction is the bandwidth roofline the command already reports, batch 4's the matmul
    rate over four tokens' FLOPs, and each ratio the measured rate over its prediction."""
    from jaxinfer.bench import latency, runs
    from jaxinfer.bench.roofline import decode_flops_per_token
    from jaxinfer.cli import _parser

    monkeypatch.setattr(runs, "_engine", lambda args, max_num_seqs=None: engine)
    context = 16 + 8 // 2  # --decode-context and half of --decode-tokens
    bandwidth = 20e9
    token_flops = decode_flops_per_token(engine.model_cfg, context)
    flops = 2 * token_flops * bandwidth / latency.token_bytes(engine, context)  # batch 1's FLOPs take half its reads
    output = tmp_path / "latency.json"
    runs.latency_main(_parser().parse_args([
        "bench", "latency", "--prompt-lens", "8", "--batch-sizes", "1,4", "--decode-tokens", "8", "--decode-context",
        "16", "--repeats", "1", "--bandwidth", str(bandwidth / 1e9), "--flops", str(flops / 1e9),
        "--output", str(output)]))
    results = json.loads(output.read_text())
    roofline, rates = results["roofline"], results["systems"]["jaxinfer"]["decode_tokens_per_s"]
    decode = roofline["decode"]
    assert (decode["1"]["bound"], decode["4"]["bound"]) == ("bandwidth", "compute")
    assert decode["1"]["predicted_tokens_per_s"] == pytest.approx(roofline["roofline_tokens_per_s"])
    assert decode["4"]["predicted_tokens_per_s"] == pytest.approx(flops / token_flops)
    assert all(decode[b]["ratio"] == pytest.approx(rates[b] / decode[b]["predicted_tokens_per_s"]) for b in ("1", "4"))
    assert "decode against its roofline" in capsys.readouterr().out


def test_compare_measures_both_engines_in_rounds(engine, monkeypatch, tmp_path, capsys):
    """`bench compare A B` loads both (here the same engine, twice) and records every figure once per
    engine and round; the JSON's medians and advantage are those of the recorded values."""
    from jaxinfer.bench import runs
    from jaxinfer.cli import _parser

    loaded = []
    monkeypatch.setattr(runs, "create_engine", lambda model, progress: loaded.append(model) or engine)
    output = tmp_path / "compare.json"
    runs.compare_main(_parser().parse_args([
        "bench", "compare", "engine-a", "engine-b", "--prompt-lens", "8", "--batch-sizes", "1,4", "--decode-tokens",
        "8", "--rounds", "3", "--output", str(output)]))
    assert loaded == ["engine-a", "engine-b"]
    results = json.loads(output.read_text())
    assert (results["a"]["model"], results["b"]["model"], results["rounds"]) == ("engine-a", "engine-b", 3)
    figures = results["figures"]
    assert list(figures) == ["TTFT@8 s", "decode tok/s @B=1", "decode tok/s @B=4"]
    for name, figure in figures.items():
        assert len(figure["a"]) == len(figure["b"]) == 3 and min(figure["a"] + figure["b"]) > 0
        assert (figure["a_median"], figure["b_median"]) == (sorted(figure["a"])[1], sorted(figure["b"])[1])
        ratio = figure["b_median"] / figure["a_median"]
        assert figure["b_advantage"] == pytest.approx(ratio if name.startswith("decode") else 1 / ratio)
    printed = capsys.readouterr().out
    assert "A: engine-a (float32)" in printed and "of 3 rounds" in printed
    with pytest.raises(RequestError, match="max_num_seqs"):
        runs.compare_main(_parser().parse_args(["bench", "compare", "a", "b", "--batch-sizes", str(MAX_NUM_SEQS + 1),
                                                "--output", str(output)]))


def test_compare_reports_each_figure_of_each_engine_as_its_own(engine, monkeypatch, tmp_path):
    """With B's TTFT twice A's and its decode rate 1.5x A's, B's advantage reads 0.5 and 1.5, won in
    no round and in every round: no figure lands on the other engine's side."""
    from jaxinfer.bench import latency, runs
    from jaxinfer.cli import _parser

    class EngineB:  # the same engine under another identity
        def __getattr__(self, name):
            return getattr(engine, name)

    other = EngineB()
    monkeypatch.setattr(runs, "create_engine", lambda model, progress: engine if model == "A" else other)
    monkeypatch.setattr(runs, "warm_up", lambda e: None)
    monkeypatch.setattr(latency, "ttft", lambda e, n, repeats, seed, vocab: 0.1 if e is engine else 0.2)
    monkeypatch.setattr(latency, "decode_rate",
                        lambda e, b, context, tokens, repeats, seed, vocab: 100.0 * b if e is engine else 150.0 * b)
    output = tmp_path / "compare.json"
    runs.compare_main(_parser().parse_args(["bench", "compare", "A", "B", "--prompt-lens", "8", "--batch-sizes", "2",
                                            "--rounds", "4", "--output", str(output)]))
    figures = json.loads(output.read_text())["figures"]
    assert figures["TTFT@8 s"]["b_advantage"] == pytest.approx(0.5) and figures["TTFT@8 s"]["b_better_rounds"] == 0
    decode = figures["decode tok/s @B=2"]
    assert (decode["a"], decode["b"]) == ([200.0] * 4, [300.0] * 4) and decode["b_better_rounds"] == 4
