"""The external baselines without their libraries: the worker protocol's arithmetic against a fake
backend on a fake clock, the llama.cpp worker run end to end on a stand-in `llama_cpp` module,
the environment checks that name the setup command, the CLI flags per baseline and the
ratios against ours."""

import argparse
import json
import socket
import sys

import pytest

from jaxinfer.bench import worker_protocol
from jaxinfer.bench.baselines import BASELINES, checkpoint_source, run_job
from jaxinfer.bench.results import Column, advantages, comparison_table
from jaxinfer.commands.bench import add_bench_parsers
from jaxinfer.errors import EngineError, RequestError

PREFILL_S = 0.001   # fake cost per prompt token of the longest prompt in the batch (first token included)
STEP_S = 0.01       # fake cost of one decode step at batch 1
BATCH_SLOWDOWN = 0.25  # each extra sequence in the batch makes a step this much slower


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeBackend:
    """Generation costs fake-clock time: prefill by prompt length, then one step per further token.
    With `jitter`, every other prefill takes that much longer (a real prefill's time varies from
    run to run; at long prompts by more than a whole decode takes); the calls numbered (from 1) in
    `slow_calls` decode 3x slower (a noisy neighbour)."""

    info = {"fake": "1"}

    def __init__(self, clock: FakeClock, jitter: float = 0.0, slow_calls: tuple[int, ...] = ()):
        self.clock, self.jitter, self.slow_calls = clock, jitter, slow_calls
        self.calls = []

    def generate(self, prompts, new_tokens):
        self.calls.append(([list(p) for p in prompts], new_tokens))
        self.clock.now += PREFILL_S * max(len(p) for p in prompts) + self.jitter * (len(self.calls) % 2)
        first = self.clock.now
        slowdown = 3 if len(self.calls) in self.slow_calls else 1
        self.clock.now += slowdown * step_s(len(prompts)) * (new_tokens - 1)
        return first


def step_s(batch: int) -> float:
    return STEP_S * (1 + BATCH_SLOWDOWN * (batch - 1))


@pytest.mark.parametrize("jitter", [0.0, 0.5])
def test_latency_protocol_recovers_the_backend_costs(jitter):
    """The decode rate counts from the first new tokens to the last: a prefill that takes longer in
    one generation than another (jitter) does not move it, and it is the median of the repeats:
    one slow generation per batch size (calls 8 and 12, after 6 TTFT calls and a warm-up) does not
    move it either."""
    clock = FakeClock()
    backend = FakeBackend(clock, jitter, slow_calls=(8, 12))
    prompts_16 = [[7] * 16 for _ in range(4)]
    job = {"job": "latency", "decode_tokens": 32, "batch_sizes": [1, 4], "decode_repeats": 3,
           "ttft_prompts": {"8": [[1] * 8] * 3, "64": [[2] * 64] * 3}, "decode_prompts": prompts_16}
    result = worker_protocol.latency(backend, job, clock)
    if not jitter:
        assert result["ttft_s"] == {"8": pytest.approx(8 * PREFILL_S), "64": pytest.approx(64 * PREFILL_S)}
    assert result["decode_tokens_per_s"] == {"1": pytest.approx(1 / step_s(1)), "4": pytest.approx(4 / step_s(4))}
    decode_calls = [(len(prompts), tokens) for prompts, tokens in backend.calls if prompts[0] == prompts_16[0]]
    assert decode_calls == [(1, 2), (1, 32), (1, 32), (1, 32), (4, 2), (4, 32), (4, 32), (4, 32)]


def test_throughput_protocol_batches_in_order_and_counts_only_requested_tokens():
    clock = FakeClock()
    backend = FakeBackend(clock)
    requests = [[[1] * 10, 5], [[2] * 30, 9], [[3] * 20, 2], [[4] * 5, 4], [[5] * 8, 1]]
    result = worker_protocol.throughput(backend, {"job": "throughput", "requests": requests, "batch_size": 2}, clock)
    assert [(len(prompts), tokens) for prompts, tokens in backend.calls] == [(2, 9), (2, 4), (1, 1)]
    expected_s = sum(PREFILL_S * width + step_s(b) * (tokens - 1) for b, width, tokens in [(2, 30, 9), (2, 20, 4), (1, 8, 1)])
    assert result == {"duration_s": pytest.approx(expected_s), "num_requests": 5, "batch_size": 2,
                      "input_tokens": 73, "output_tokens": 21}


def test_max_sequence_len_covers_every_generation():
    assert worker_protocol.max_sequence_len(
        {"job": "throughput", "requests": [[[1] * 10, 50], [[1] * 40, 30], [[1] * 3, 2]]}) == 70
    latency_job = {"job": "latency", "decode_tokens": 1, "ttft_prompts": {"5": [[1] * 5], "9": [[1] * 9]},
                   "decode_prompts": [[1] * 16]}
    assert worker_protocol.max_sequence_len(latency_job) == 16 + worker_protocol.WARM_UP_TOKENS
    assert worker_protocol.max_sequence_len({**latency_job, "decode_tokens": 64}) == 16 + 64


FAKE_LLAMA_CPP = '''
"""Stands in for llama_cpp: records what the worker asks of it, yields token 7 forever (never EOS)."""
import atexit, json, os

__version__ = "0.0-fake"
LOG = []
atexit.register(lambda: open(os.environ["FAKE_LLAMA_LOG"], "w").write(json.dumps(LOG)))


class Llama:
    def __init__(self, model_path, n_ctx, n_threads, n_threads_batch, verbose):
        LOG.append({"init": [model_path, n_ctx, n_threads, n_threads_batch]})
        self.n_tokens = 5  # state left by some earlier generation

    def reset(self):
        self.n_tokens = 0

    def generate(self, tokens, temp, reset):
        entry = {"prompt_len": len(tokens), "after_reset": self.n_tokens == 0, "temp": temp, "pulled": 0}
        LOG.append(entry)
        while True:
            entry["pulled"] += 1
            self.n_tokens += 1
            yield 7
'''


def test_llamacpp_worker_generates_exactly_the_requested_tokens(tmp_path, monkeypatch):
    (tmp_path / "llama_cpp.py").write_text(FAKE_LLAMA_CPP)
    log = tmp_path / "log.json"
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("FAKE_LLAMA_LOG", str(log))
    requests = [[[3] * 12, 6], [[4] * 20, 3]]
    result = run_job(BASELINES["llamacpp"], sys.executable,
                     {"job": "throughput", "model": "m.gguf", "batch_size": 1, "requests": requests, "threads": 2})
    assert result["num_requests"] == 2 and result["output_tokens"] == 9 and result["input_tokens"] == 32
    assert result["llama_cpp_python"] == "0.0-fake" and result["threads"] == 2
    init, *generations = json.loads(log.read_text())
    assert init == {"init": ["m.gguf", 20 + 3, 2, 2]}
    # the warm-up, then each request alone from an empty cache, greedy, exactly max_tokens pulled
    assert [(g["prompt_len"], g["pulled"]) for g in generations] == [(3, 2), (12, 6), (20, 3)]
    assert all(g["after_reset"] and g["temp"] == 0.0 for g in generations)


def test_llamacpp_worker_refuses_batches(tmp_path, monkeypatch):
    (tmp_path / "llama_cpp.py").write_text(FAKE_LLAMA_CPP)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("FAKE_LLAMA_LOG", str(tmp_path / "log.json"))
    with pytest.raises(EngineError, match="one sequence at a time"):
        run_job(BASELINES["llamacpp"], sys.executable,
                {"job": "throughput", "model": "m.gguf", "batch_size": 2, "requests": [[[1], 1], [[2], 1]]})


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_python_without_the_library_names_the_setup_command(tmp_path, name):
    # -S: no site-packages, so neither torch/transformers nor llama_cpp can be found whatever is installed
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    python.chmod(0o755)
    with pytest.raises(EngineError, match=f"has no {BASELINES[name].module}; run scripts/setup_baselines.sh {name}"):
        run_job(BASELINES[name], python, {"job": "latency"})
    with pytest.raises(EngineError, match=f"does not exist; run scripts/setup_baselines.sh {name}"):
        run_job(BASELINES[name], tmp_path / "missing" / "python", {"job": "latency"})


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_refuse_random_weights_before_measuring(name):
    from jaxinfer.bench.runs import latency_main

    args = argparse.Namespace(model="random:configs/models/smollm2-135m", baseline=[name])
    with pytest.raises(EngineError, match=f"needs real weights.*drop --baseline {name}"):
        latency_main(args)  # refused before the engine is built: args has nothing else it would need


def test_llamacpp_needs_a_gguf_file(tmp_path):
    assert checkpoint_source(None, BASELINES["llamacpp"]).endswith(".gguf")
    assert checkpoint_source(tmp_path, BASELINES["hf"]) == str(tmp_path)
    with pytest.raises(EngineError, match="loads .gguf files only"):
        checkpoint_source(tmp_path, BASELINES["llamacpp"])


def parse(argv):
    parser = argparse.ArgumentParser()
    add_bench_parsers(parser.add_subparsers())
    return parser.parse_args(argv)


def test_cli_flags_per_baseline():
    args = parse(["bench", "throughput", "--baseline", "llamacpp", "--baseline", "hf",
                  "--llamacpp-python", "/x/python", "--llamacpp-num-requests", "16"])
    assert args.baseline == ["llamacpp", "hf"]
    assert (args.llamacpp_python, args.llamacpp_num_requests) == ("/x/python", 16)
    assert (args.hf_python, args.hf_batch_size) == (".venv-hf/bin/python", 8)
    assert not hasattr(args, "llamacpp_batch_size")  # it generates one request at a time
    assert args.baseline_threads is None
    args = parse(["bench", "latency", "--baseline", "llamacpp", "--baseline-threads", "1"])
    assert (args.llamacpp_python, args.baseline_threads) == (".venv-llamacpp/bin/python", 1)
    with pytest.raises(SystemExit):  # static batching needs a workload of requests
        parse(["bench", "latency", "--baseline", "static"])


@pytest.mark.parametrize("argv, message", [
    (["throughput", "--input-len", "5:3"], "length range 5:3 must satisfy 1 <= low <= high"),
    (["throughput", "--output-len", "x"], "length 'x' is neither N nor LO:HI"),
    (["throughput", "--num-requests", "0"], "argument --num-requests: '0' must be > 0"),
    (["throughput", "--static-batch", "0"], "argument --static-batch: '0' must be > 0"),
    (["latency", "--decode-tokens", "1"], "argument --decode-tokens: '1' must be >= 2"),
    (["throughput", "--dataset", "no/such.jsonl"], "argument --dataset: no/such.jsonl is not a file"),
    (["serve", "--dataset", __file__], f"argument --dataset: {__file__}:1 is not JSON"),
    (["throughput", "--hf-batch-size", "-2"], "argument --hf-batch-size: '-2' must be > 0"),
    (["latency", "--prompt-lens", "16,0"], "argument --prompt-lens: '0' must be > 0"),
    (["latency", "--repeats", "0"], "argument --repeats: '0' must be > 0"),
    (["latency", "--seed", "-1"], "argument --seed: '-1' must be >= 0"),
    (["latency", "--max-num-seqs", "x"], "argument --max-num-seqs: 'x' is not an int"),
    (["serve", "--request-rate", "1,x"], "argument --request-rate: 'x' is not a float"),
    (["serve", "--burstiness", "0"], "argument --burstiness: '0' must be > 0"),
    (["serve", "--slo", "ttft=fast"], "SLO item 'ttft=fast' is not METRIC=VALUE"),
])
def test_bad_values_are_refused_by_name_before_anything_loads(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse(["bench", *argv])
    assert message in capsys.readouterr().err


def test_latency_refuses_batches_above_max_num_seqs_before_compiling(monkeypatch):
    from jaxinfer.bench import runs

    monkeypatch.setattr(runs, "_engine", lambda *args, **kwargs: pytest.fail("the engine was created"))
    with pytest.raises(RequestError, match="--batch-sizes 8 exceeds the engine's max_num_seqs \\(4\\)"):
        runs.latency_main(parse(["bench", "latency", "--max-num-seqs", "4", "--batch-sizes", "1,8"]))


@pytest.mark.parametrize("lengths, message", [
    (["--prompt-lens", "16,64"], "--prompt-lens 64 leaves no room for a token in the engine's max_model_len \\(64\\)"),
    (["--decode-context", "40", "--decode-tokens", "25"],
     "--decode-context 40 \\+ --decode-tokens 25 exceed the engine's max_model_len \\(64\\)"),
])
def test_latency_refuses_lengths_beyond_max_model_len_before_measuring(monkeypatch, lengths, message):
    from types import SimpleNamespace

    from jaxinfer.bench import runs

    engine = SimpleNamespace(engine_cfg=SimpleNamespace(max_num_seqs=8, max_model_len=64))
    monkeypatch.setattr(runs, "_engine", lambda *args, **kwargs: engine)
    monkeypatch.setattr(runs, "warm_up", lambda engine: pytest.fail("the engine ran a request"))
    runs._refuse_lengths(parse(["bench", "latency", "--prompt-lens", "63", "--decode-context", "40",
                                "--decode-tokens", "24"]), 64)  # the limits themselves fit
    with pytest.raises(RequestError, match=message):
        runs.latency_main(parse(["bench", "latency", "--prompt-lens", "16", *lengths]))


def test_static_baseline_refuses_workloads_whose_padded_batches_exceed_max_model_len():
    from jaxinfer.bench.runs import workload

    bench = ["bench", "throughput", "--num-requests", "32", "--input-len", "16:100", "--output-len", "16:100"]
    requests = workload(parse(bench), 1000, None, max_model_len=10**6)
    limit = max(len(r.prompt_token_ids) + r.max_tokens for r in requests)  # every request fits
    assert max(len(r.prompt_token_ids) for r in requests) + max(r.max_tokens for r in requests) > limit
    assert workload(parse(bench), 1000, None, limit) == requests
    with pytest.raises(RequestError, match=f"static batching pads each batch .* max_model_len \\({limit}\\)"):
        workload(parse(bench), 1000, None, limit, static=True)


@pytest.mark.parametrize("argv, message", [
    (["throughput", "--temperature", "0.7", "--baseline", "hf"], "the hf baseline generates greedily"),
    (["throughput", "--top-p", "2"], "invalid sampling parameter top_p=2.0"),
    (["serve", "--top-k", "-3"], "invalid sampling parameter top_k=-3"),
    (["serve", "--dataset", "PROMPTS", "--prefix-len", "8"], "--prefix-len shapes random prompts"),
    (["throughput", "--static-batch", "8"], "--static-batch sizes the batches of --baseline static"),
    (["serve", "--target", "127.0.0.1:1", "--max-num-seqs", "8", "--kv-memory", "1GiB"],
     "the server's engine is measured: --max-num-seqs and --kv-memory would be ignored"),
    (["serve", "engines/bf16", "--target", "127.0.0.1:1"], "the server's engine is measured: MODEL would be ignored"),
    (["serve", "--concurrency", "2", "--burstiness", "0.5"], "--burstiness shapes the arrivals of --request-rate"),
])
def test_bench_workload_options_are_checked_before_the_engine_loads(monkeypatch, tmp_path, argv, message):
    from jaxinfer.bench import runs

    monkeypatch.setattr(runs, "_engine", lambda *args, **kwargs: pytest.fail("the engine was created"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hello"}\n')
    args = parse(["bench", *[str(prompts) if arg == "PROMPTS" else arg for arg in argv]])
    with pytest.raises(RequestError, match=message):
        getattr(runs, f"{argv[0]}_main")(args)


def test_a_static_batch_the_engine_cannot_step_as_one_is_refused():
    from types import SimpleNamespace

    from jaxinfer.bench.runs import _static_batch

    engine = SimpleNamespace(engine_cfg=SimpleNamespace(max_num_seqs=16))
    args = parse(["bench", "throughput", "--baseline", "static", "--static-batch", "16"])
    assert _static_batch(args, engine) == (16, "static batching (B=16)")
    assert _static_batch(parse(["bench", "throughput", "--baseline", "static"]), engine)[0] == 16
    with pytest.raises(RequestError, match=r"--static-batch 17 exceeds the engine's max_num_seqs \(16\)"):
        _static_batch(parse(["bench", "throughput", "--baseline", "static", "--static-batch", "17"]), engine)


def test_an_unreachable_server_is_named():
    from jaxinfer.bench.grpc_load import model_info
    from serving.client_connection import ServerConnection

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(RequestError, match=f"127.0.0.1:{port}: the model info request failed \\(UNAVAILABLE: .*"
                                           "start `jaxinfer serve` there and wait until it is ready, or fix --target"):
        model_info(ServerConnection(f"127.0.0.1:{port}", address_flag="--target"))


def test_advantages_in_table_and_json_agree():
    columns = [Column(("ttft_s", "128"), "TTFT@128 s", False, "{:.4f}"),
               Column(("decode_tokens_per_s", "1"), "decode tok/s @B=1", True, "{:.1f}"),
               Column(("decode_tokens_per_s", "8"), "decode tok/s @B=8", True, "{:.1f}")]
    systems = {"jaxinfer": {"ttft_s": {"128": 0.5}, "decode_tokens_per_s": {"1": 20.0, "8": 60.0}},
               "llama.cpp": {"ttft_s": {"128": 0.25}, "decode_tokens_per_s": {"1": 80.0}}}
    assert advantages(systems, columns, "jaxinfer") == {"llama.cpp": {"TTFT@128 s": 0.5, "decode tok/s @B=1": 0.25}}
    row = comparison_table(systems, columns, "jaxinfer").splitlines()[2]
    assert row.split()[1:] == ["0.2500", "(0.50x)", "80.0", "(0.25x)", "-"]


def test_a_workload_total_is_compared_only_between_runs_of_the_same_requests():
    from jaxinfer.bench.runs import THROUGHPUT_COLUMNS

    ours = {"num_requests": 256, "requests_per_s": 2.0, "input_tokens_per_s": 10.0, "output_tokens_per_s": 5.0,
            "duration_s": 128.0}
    systems = {"jaxinfer": ours, "static": {**ours, "output_tokens_per_s": 2.5, "duration_s": 256.0},
               "hf (32 requests)": {**ours, "num_requests": 32, "output_tokens_per_s": 0.5, "duration_s": 160.0}}
    ratios = advantages(systems, THROUGHPUT_COLUMNS, "jaxinfer")
    assert ratios["static"]["wall s"] == 2.0 and ratios["static"]["output tokens/s"] == 2.0
    assert "wall s" not in ratios["hf (32 requests)"] and ratios["hf (32 requests)"]["output tokens/s"] == 10.0


def test_the_latency_chart_has_a_bar_for_each_system_measured_at_its_batch_size():
    from jaxinfer.bench.runs import decode_bars

    systems = {"jaxinfer": {"decode_tokens_per_s": {"1": 90.0, "8": 300.0}},
               "hf transformers": {"decode_tokens_per_s": {"1": 25.0, "8": 140.0}},
               "llama.cpp": {"decode_tokens_per_s": {"1": 120.0}}}  # llama.cpp does not batch
    assert decode_bars(systems, 1, 100.0) == {"jaxinfer": 90.0, "hf transformers": 25.0, "llama.cpp": 120.0,
                                              "bandwidth roofline": 100.0}
    assert decode_bars(systems, 8, 100.0) == {"jaxinfer": 300.0, "hf transformers": 140.0}
