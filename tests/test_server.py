"""The jaxinfer.v1 gRPC API and the KServe v2 API (through tritonclient) against a real server (child process, loopback port, tiny checkpoint):
streamed and unary greedy replies equal the offline engine's, tokenizer RPCs equal the tokenizer,
every bad input gets its status while the server keeps serving, cancellation / deadline / Abort
give the KV blocks back, the queue limit answers RESOURCE_EXHAUSTED, reflection and metrics."""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.request

import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kserve_pb2_grpc
from tritonclient.utils import InferenceServerException
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from jaxinfer.sampling_params import SamplingParams
from jaxinfer.scheduler import BlockManager, Sequence
from jaxinfer.scheduler.scheduler import SchedulerMetrics
from serving.child_server import ChildServer
from serving.engine_loop import EngineSnapshot
from serving.metrics import ServerMetrics
from serving.protos import jaxinfer_pb2 as pb
from serving.protos import jaxinfer_pb2_grpc

TINY = "tests/checkpoints/tiny-llama3"
# One model step per engine call (multi-step decode is tested in test_engine.py): a long request then
# lasts about 0.2 s rather than 0.06, long enough for the cancellation, deadline and metrics tests to
# act while it runs, and every token is its own engine output.
ENGINE = {"max_num_seqs": 8, "max_num_batched_tokens": 64, "max_model_len": 256, "kv_memory": "8MiB",
          "decode_steps": 1}
MAX_QUEUED = 12


@pytest.fixture(scope="module")
def server_and_oracle():
    """The server, and the offline engine as the oracle, built at the same time."""
    from jaxinfer.engine.create import create_engine

    child = ChildServer({"model": TINY, **ENGINE}, {"metrics_port": 0, "max_queued_requests": MAX_QUEUED}).launch()
    try:
        engine = create_engine(TINY, progress=False, **ENGINE)
        yield child.wait_serving(), engine
    finally:
        child.stop()


@pytest.fixture(scope="module")
def server(server_and_oracle):
    return server_and_oracle[0]


@pytest.fixture(scope="module")
def offline_engine(server_and_oracle):
    return server_and_oracle[1]


@pytest.fixture(scope="module")
def stub(server):
    with server.channel() as channel:
        yield jaxinfer_pb2_grpc.JaxinferStub(channel)


def offline_greedy(engine, prompt_ids: list[int], max_tokens: int, ignore_eos: bool = True) -> tuple[list[int], str]:
    from jaxinfer.sampling_params import SamplingParams

    engine.add_request("oracle", params=SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos),
                       prompt_token_ids=prompt_ids)
    while engine.has_unfinished_requests():
        for output in engine.step():
            last = output
    return last.outputs[0].token_ids, last.outputs[0].text


def greedy(max_tokens: int, **fields) -> pb.SamplingParameters:
    return pb.SamplingParameters(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **fields)


def random_prompt(rng: np.random.Generator, length: int) -> pb.TokenIds:
    return pb.TokenIds(ids=rng.integers(3, 512, size=length).tolist())


def scrape(server) -> dict[str, float]:
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if not sample.labels.get("le")}


def wait_metrics(server, holds, timeout_s: float = 10.0, poll_s: float = 0.05) -> dict[str, float]:
    """Scrapes the metrics until `holds(metrics)` or the timeout; returns the last scrape."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = scrape(server)
        if holds(metrics) or time.monotonic() > deadline:
            return metrics
        time.sleep(poll_s)


def wait_kv_free(server, timeout_s: float = 10.0) -> dict[str, float]:
    """Waits until no request runs or waits and no KV block is referenced; returns the metrics."""
    return wait_metrics(server, lambda m: m["jaxinfer:num_requests_running"] == 0
                        and m["jaxinfer:num_requests_waiting"] == 0 and m["jaxinfer:kv_cache_usage_perc"] == 0,
                        timeout_s)


def test_health_and_reflection(server):
    assert server.health() == health_pb2.HealthCheckResponse.SERVING
    assert server.health("jaxinfer.v1.Jaxinfer") == health_pb2.HealthCheckResponse.SERVING
    with server.channel() as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        [reply] = list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        [reply] = list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="jaxinfer.v1.Jaxinfer")])))
    assert {"jaxinfer.v1.Jaxinfer", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    assert reply.file_descriptor_response.file_descriptor_proto


def test_stream_and_unary_equal_offline_greedy(stub, offline_engine):
    rng = np.random.default_rng(1)
    for length, max_tokens in ((5, 12), (70, 20), (1, 3)):  # 70 > token budget: chunked prefill
        prompt = random_prompt(rng, length)
        want_ids, want_text = offline_greedy(offline_engine, list(prompt.ids), max_tokens)
        responses = list(stub.Generate(pb.GenerateRequest(token_ids=prompt, sampling=greedy(max_tokens))))
        streamed = [t for r in responses for c in r.outputs for t in c.token_ids]
        assert streamed == want_ids
        assert "".join(c.text for r in responses for c in r.outputs) == want_text
        final = responses[-1]
        assert final.finished and not any(r.finished for r in responses[:-1])
        assert final.outputs[0].finish_reason == pb.FINISH_REASON_LENGTH
        assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (length, max_tokens)
        unary = stub.GenerateUnary(pb.GenerateRequest(token_ids=prompt, sampling=greedy(max_tokens)))
        assert list(unary.outputs[0].token_ids) == want_ids and unary.outputs[0].text == want_text
        assert unary.usage.cached_tokens <= length  # the stream left the same prompt in the prefix cache


def test_text_chat_n_and_logprobs(stub, server, offline_engine):
    tokenizer = offline_engine.tokenizer
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hello there")])
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hello there"}])
    assert list(stub.Tokenize(pb.TokenizeRequest(chat=chat)).token_ids) == tokenizer.encode(rendered)
    from_chat = stub.GenerateUnary(pb.GenerateRequest(chat=chat, sampling=greedy(6)))
    from_text = stub.GenerateUnary(pb.GenerateRequest(text=rendered, sampling=greedy(6)))
    assert list(from_chat.outputs[0].token_ids) == list(from_text.outputs[0].token_ids)
    assert from_chat.usage.prompt_tokens == len(tokenizer.encode(rendered))

    sampled = stub.GenerateUnary(pb.GenerateRequest(text="once upon", sampling=pb.SamplingParameters(
        n=3, seed=7, max_tokens=5, ignore_eos=True, logprobs=2)))
    assert sorted(c.index for c in sampled.outputs) == [0, 1, 2]
    for completion in sampled.outputs:
        assert len(completion.logprobs) == len(completion.token_ids) == 5
        for token, position in zip(completion.token_ids, completion.logprobs):
            assert position.entries[0].token_id == token
            assert all(e.logprob <= 0 and math.isfinite(e.logprob) for e in position.entries)
            assert 2 <= len(position.entries) <= 3
    assert sampled.usage.completion_tokens == 15


def test_tokenize_detokenize_model_info(stub, offline_engine):
    tokenizer, cfg = offline_engine.tokenizer, offline_engine.engine_cfg
    text = "To be, or not to be"
    ids = list(stub.Tokenize(pb.TokenizeRequest(text=text)).token_ids)
    assert ids == tokenizer.encode(text)
    assert list(stub.Tokenize(pb.TokenizeRequest(text=text, add_special_tokens=False)).token_ids) == \
        tokenizer.encode(text, add_special_tokens=False)
    assert stub.Detokenize(pb.DetokenizeRequest(token_ids=ids)).text == tokenizer.decode(ids)
    info = stub.ModelInfo(pb.ModelInfoRequest())
    assert (info.vocab_size, info.num_layers, info.max_model_len) == (
        offline_engine.model_cfg.vocab_size, offline_engine.model_cfg.num_layers, cfg.max_model_len)
    assert (info.engine.max_num_seqs, info.engine.block_size, info.engine.dtype) == (
        cfg.max_num_seqs, cfg.block_size, cfg.dtype)
    assert info.max_queued_requests == MAX_QUEUED and info.num_kv_blocks == offline_engine.runner.num_blocks


BAD_REQUESTS = {
    "no prompt": pb.GenerateRequest(sampling=greedy(4)),
    "empty text": pb.GenerateRequest(text="", sampling=greedy(4)),
    "empty token ids": pb.GenerateRequest(token_ids=pb.TokenIds(), sampling=greedy(4)),
    "empty chat": pb.GenerateRequest(chat=pb.ChatMessages(), sampling=greedy(4)),
    "prompt too long": pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 300), sampling=greedy(4)),
    "prompt + max_tokens too long": pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 200), sampling=greedy(100)),
    "max_tokens 0": pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(max_tokens=0)),
    "max_tokens negative": pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(max_tokens=-3)),
    "max_tokens beyond limit": pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(max_tokens=10**6)),
    "temperature negative": pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(temperature=-0.5)),
    "temperature NaN": pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(temperature=math.nan)),
    "top_p 0": pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(top_p=0.0)),
    "top_p above 1": pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(top_p=1.5)),
    "top_k -2": pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(top_k=-2)),
    "n too large": pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(n=64)),
    "unknown token id": pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 512, 7]), sampling=greedy(4)),
    "unknown stop token id": pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(stop_token_ids=[9999])),
    "too many logprobs": pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(logprobs=50)),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_is_invalid_argument_and_server_keeps_serving(stub, case):
    for call in (lambda r: list(stub.Generate(r)), stub.GenerateUnary):
        with pytest.raises(grpc.RpcError) as err:
            call(BAD_REQUESTS[case])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert len(err.value.details()) > 20
    assert stub.GenerateUnary(pb.GenerateRequest(text="still", sampling=greedy(2))).usage.completion_tokens == 2


def test_malformed_utf8_and_oversized_messages(server, stub):
    valid = pb.GenerateRequest(text="Xy", sampling=greedy(2)).SerializeToString()
    malformed = valid.replace(b"Xy", b"\xff\xfe")  # same lengths, so the framing stays valid
    with server.channel() as channel:
        raw_generate = channel.unary_unary("/jaxinfer.v1.Jaxinfer/GenerateUnary",
                                           request_serializer=lambda b: b, response_deserializer=lambda b: b)
        assert pb.GenerateResponse.FromString(raw_generate(valid)).finished
        with pytest.raises(grpc.RpcError) as err:
            raw_generate(malformed)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.GenerateUnary(pb.GenerateRequest(text="x" * (5 * 2**20)))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert server.health() == health_pb2.HealthCheckResponse.SERVING


def long_request(request_id: str = "", max_tokens: int = 200) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=request_id, text="a long one", sampling=greedy(max_tokens))


def test_cancel_deadline_and_abort_return_kv_blocks(server, stub):
    call = stub.Generate(long_request())
    next(call), next(call)
    # The metrics snapshot is refreshed every 50 ms; the request runs for longer than that.
    assert wait_metrics(server, lambda m: m["jaxinfer:kv_cache_usage_perc"] > 0, 2.0, 0.01)[
        "jaxinfer:kv_cache_usage_perc"] > 0
    call.cancel()
    assert wait_kv_free(server)["jaxinfer:kv_cache_usage_perc"] == 0

    # 240 tokens take 240 engine steps: far longer than the deadline, however idle the machine.
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(long_request(max_tokens=240), timeout=0.05))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_kv_free(server)["jaxinfer:kv_cache_usage_perc"] == 0

    call = stub.Generate(long_request("to-abort"))
    next(call)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(long_request("to-abort")))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert stub.Abort(pb.AbortRequest(request_id="to-abort")).found
    rest = list(call)
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == pb.FINISH_REASON_ABORT
    assert not stub.Abort(pb.AbortRequest(request_id="to-abort")).found
    assert wait_kv_free(server)["jaxinfer:kv_cache_usage_perc"] == 0


def test_queue_limit_is_resource_exhausted(server, stub):
    calls = [stub.Generate(long_request(f"hold-{i}")) for i in range(MAX_QUEUED)]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # all held: 8 running, the rest waiting in the engine
        metrics = scrape(server)
        if metrics["jaxinfer:num_requests_running"] + metrics["jaxinfer:num_requests_waiting"] == MAX_QUEUED:
            break
        time.sleep(0.02)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(long_request("one-too-many")))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for call in calls:
        call.cancel()
    assert wait_kv_free(server)["jaxinfer:kv_cache_usage_perc"] == 0
    assert stub.GenerateUnary(pb.GenerateRequest(text="after", sampling=greedy(2))).finished


def test_bench_serve_counts_the_requests_a_full_queue_refuses(server, tmp_path):
    from jaxinfer.bench.runs import serve_main
    from jaxinfer.cli import _parser

    sent = MAX_QUEUED + 8  # all at once, each long enough to hold its place until the last is sent
    output = tmp_path / "serve.json"
    serve_main(_parser().parse_args(["bench", "serve", "--target", server.address, "--concurrency", str(sent),
                                     "--num-requests", str(sent), "--input-len", "8:16", "--output-len", "200",
                                     "--prefix-len", "32", "--output", str(output)]))
    point = json.loads(output.read_text())["curves"]["jaxinfer serve"][0]
    assert point["num_requests"] >= MAX_QUEUED and point["num_requests"] + point["failed_requests"] == sent
    assert point["failed_requests"] > 0 and all(e.startswith("RESOURCE_EXHAUSTED") for e in point["errors"])
    assert point["output_tokens"] == 200 * point["num_requests"] and point["tpot_s"]["count"] == point["num_requests"]
    assert 0 < point["prefix_cache_hit_rate"] < 32 / (32 + 8)  # the usage's cached_tokens, read by the client
    assert wait_kv_free(server)["jaxinfer:kv_cache_usage_perc"] == 0


TEXTS = ["The quick brown fox", "jumps over the lazy dog", "Hello, world! 123", "Paris is the capital of France."]
PROMPTS_FILE = "".join(json.dumps({"prompt": text, "max_tokens": 4}) + "\n" for text in TEXTS[:3])
# Two usable conversations (the last turn is never asked), and one with no reply, which is skipped.
SHAREGPT_FILE = json.dumps([{"conversations": [{"from": speaker, "value": TEXTS[i]} for speaker, i in turns]}
                            for turns in [[("human", 0), ("gpt", 1), ("human", 2)], [("human", 2)],
                                          [("human", 3), ("gpt", 0)]]])


@pytest.mark.parametrize("name, content, prompts, replies", [
    ("prompts.jsonl", PROMPTS_FILE, TEXTS[:3], None),
    ("sharegpt.json", SHAREGPT_FILE, [TEXTS[0], TEXTS[3]], [TEXTS[1], TEXTS[0]])])
def test_bench_serve_tokenizes_a_text_dataset_on_the_server(server, offline_engine, tmp_path, name, content, prompts,
                                                            replies):
    from jaxinfer.bench.runs import serve_main
    from jaxinfer.cli import _parser

    dataset = tmp_path / name
    dataset.write_text(content)
    output = tmp_path / "serve.json"
    serve_main(_parser().parse_args(["bench", "serve", "--target", server.address, "--dataset", str(dataset),
                                     "--output", str(output)]))
    results = json.loads(output.read_text())
    point = results["curves"]["jaxinfer serve"][0]
    encode = offline_engine.tokenizer.encode
    want_outputs = 4 * len(prompts) if replies is None else sum(len(encode(reply)) for reply in replies)
    assert results["workload"]["input_tokens"] == point["input_tokens"] == sum(len(encode(p)) for p in prompts)
    assert (point["num_requests"], point["output_tokens"]) == (len(prompts), want_outputs)


def test_concurrent_streams_equal_offline(stub, offline_engine):
    rng = np.random.default_rng(2)
    prompts = [random_prompt(rng, int(n)) for n in rng.integers(2, 40, size=6)]
    want = [offline_greedy(offline_engine, list(p.ids), 16)[0] for p in prompts]
    got = [None] * len(prompts)

    def run(i):
        got[i] = [t for r in stub.Generate(pb.GenerateRequest(token_ids=prompts[i], sampling=greedy(16)))
                  for c in r.outputs for t in c.token_ids]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert got == want


def test_metrics_count_requests(server, stub):
    before = scrape(server)
    prompt = pb.TokenIds(ids=list(range(10, 27)))
    for _ in range(2):  # the second is a prefix-cache hit
        stub.GenerateUnary(pb.GenerateRequest(token_ids=prompt, sampling=greedy(5)))
    after = wait_kv_free(server)

    def delta(name):
        return after[name] - before.get(name, 0.0)

    assert delta("jaxinfer:prompt_tokens_total") == 34
    assert delta("jaxinfer:generation_tokens_total") == 10
    assert delta("jaxinfer:time_to_first_token_seconds_count") == 2
    assert delta("jaxinfer:e2e_request_latency_seconds_count") == 2
    assert delta("jaxinfer:request_queue_time_seconds_count") == 2
    assert delta("jaxinfer:inter_token_latency_seconds_count") == 8
    assert delta("jaxinfer:prefix_cache_queries_total") >= 34
    assert delta("jaxinfer:prefix_cache_hits_total") >= 16
    assert after["jaxinfer:num_requests_running"] == 0


def test_engine_state_gauges_read_the_block_managers_snapshot():
    rng = np.random.default_rng(3)
    bm = BlockManager(num_blocks=11, block_size=4)
    for index, length in enumerate((5, 11, 8)):  # 2 + 3 + 2 blocks holding 24 tokens in 28 slots
        seq = Sequence("r", index, rng.integers(1, 1000, size=length).tolist(), SamplingParams(), 0, 0.0, 0)
        assert bm.admit(seq, bm.find_cached_prefix(seq), length)
    snapshot = EngineSnapshot(SchedulerMetrics(3, 1, 0, bm.metrics()), num_steps=5, step_seconds_total=0.5)
    registry = ServerMetrics("m", lambda: snapshot).registry

    def gauge(name):
        return registry.get_sample_value(f"jaxinfer:{name}", {"model_name": "m"})

    assert gauge("kv_cache_usage_perc") == pytest.approx(7 / 10)
    assert gauge("kv_cache_fragmentation_perc") == pytest.approx(4 / 28)
    assert (gauge("num_requests_running"), gauge("num_requests_waiting")) == (3, 1)


# -- KServe v2 through tritonclient ------------------------------------------------------------


@pytest.fixture(scope="module")
def triton_client(server):
    client = triton.InferenceServerClient(url=server.address)
    yield client
    client.close()


def triton_inputs(text: bytes, max_tokens: int, **scalars) -> list[triton.InferInput]:
    arrays = {"text_input": np.array([[text]], dtype=object), "max_tokens": np.array([[max_tokens]], dtype=np.int32)}
    arrays.update({name: np.array([[value]]) for name, value in scalars.items()})
    datatypes = {np.dtype(object): "BYTES", np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT32",
                 np.dtype(np.float64): "FP32", np.dtype(bool): "BOOL"}
    inputs = []
    for name, array in arrays.items():
        datatype = datatypes[array.dtype]
        tensor = triton.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array.astype({"INT32": np.int32, "FP32": np.float32}.get(datatype, array.dtype)))
        inputs.append(tensor)
    return inputs


def test_kserve_health_and_metadata(triton_client, offline_engine):
    name = offline_engine.model_cfg.name
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready(name)
    assert triton_client.get_server_metadata().name == "jaxinfer"
    metadata = triton_client.get_model_metadata(name)
    assert {"text_input", "max_tokens", "temperature", "top_k", "top_p", "stream"} <= {t.name for t in metadata.inputs}
    assert [t.name for t in metadata.outputs] == ["text_output"]
    with pytest.raises(InferenceServerException) as err:
        triton_client.get_model_metadata("no-such-model")
    assert "NOT_FOUND" in err.value.status()


def test_kserve_infer_equals_offline_greedy(triton_client, offline_engine):
    prompt = "The quick brown fox"
    want_ids, want_text = offline_greedy(offline_engine, offline_engine.tokenizer.encode(prompt), 10, ignore_eos=False)
    result = triton_client.infer(offline_engine.model_cfg.name, triton_inputs(prompt.encode(), 10, temperature=0.0),
                                 outputs=[triton.InferRequestedOutput("text_output")])
    assert result.as_numpy("text_output").reshape(-1)[0].decode() == want_text


def test_kserve_stream_infer_equals_offline_greedy(triton_client, offline_engine):
    name = offline_engine.model_cfg.name
    prompts = ["Once upon a time", "To be or not"]
    want = [offline_greedy(offline_engine, offline_engine.tokenizer.encode(p), 12, ignore_eos=False)[1] for p in prompts]
    results: queue.Queue = queue.Queue()
    triton_client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for i, prompt in enumerate(prompts):
            triton_client.async_stream_infer(name, triton_inputs(prompt.encode(), 12, temperature=0.0, stream=True),
                                             request_id=str(i), enable_empty_final_response=True)
        triton_client.async_stream_infer(name, triton_inputs(b"\xff\xfe bad", 4), request_id="bad")
        texts, finals, errors = {"0": "", "1": ""}, set(), []
        while len(finals) < 2 or not errors:
            result, error = results.get(timeout=30)
            if error is not None:
                errors.append(str(error))
                continue
            response = result.get_response()
            assert response.id not in finals, "a response after the final one"
            if response.parameters["triton_final_response"].bool_param:
                finals.add(response.id)
            else:
                texts[response.id] += result.as_numpy("text_output").reshape(-1)[0].decode()
    finally:
        triton_client.stop_stream()
    assert [texts["0"], texts["1"]] == want
    assert len(errors) == 1 and "INVALID_ARGUMENT" in errors[0] and "UTF-8" in errors[0]


@pytest.mark.parametrize("case", ["malformed UTF-8", "no max_tokens", "top_p above 1", "unknown input",
                                  "unknown model", "beam search"])
def test_kserve_bad_request(triton_client, offline_engine, case):
    name = offline_engine.model_cfg.name
    inputs = {"malformed UTF-8": triton_inputs(b"ok \xc3\x28", 4),
              "no max_tokens": triton_inputs(b"hi", 4)[:1],
              "top_p above 1": triton_inputs(b"hi", 4, top_p=1.5),
              "unknown input": triton_inputs(b"hi", 4, bogus=1),
              "unknown model": triton_inputs(b"hi", 4),
              "beam search": triton_inputs(b"hi", 4, beam_width=4)}[case]
    with pytest.raises(InferenceServerException) as err:
        triton_client.infer("other-model" if case == "unknown model" else name, inputs)
    assert ("NOT_FOUND" if case == "unknown model" else "INVALID_ARGUMENT") in err.value.status()
    assert triton_client.is_server_ready()


def kserve_request(model_name: str, **tensors: tuple[str, list[int], bytes]) -> kpb.ModelInferRequest:
    """A ModelInferRequest of raw tensors, name=(datatype, shape, raw bytes), built from tritonclient's
    protos, whose InferInput would not send most of the wrong ones tested here."""
    request = kpb.ModelInferRequest(model_name=model_name)
    for name, (datatype, shape, raw) in tensors.items():
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    return request


def raw_text(text: bytes) -> bytes:
    return len(text).to_bytes(4, "little") + text


PROMPT = ("BYTES", [1, 1], raw_text(b"Paris is"))
MAX_TOKENS = ("INT32", [1, 1], np.int32(3).tobytes())
# case -> (the tensor that replaces or joins the valid ones, what the error says)
WRONG_TENSORS = {
    "temperature as BYTES": ({"temperature": ("BYTES", [1, 1], raw_text(b"abc"))},
                             "'temperature' is BYTES, not a floating-point type; send it as FP32"),
    "max_tokens as FP32 NaN": ({"max_tokens": ("FP32", [1, 1], np.float32(np.nan).tobytes())},
                               "'max_tokens' is FP32, not an integer type; send it as INT32"),
    "max_tokens as FP32 2.7": ({"max_tokens": ("FP32", [1, 1], np.float32(2.7).tobytes())},
                               "'max_tokens' is FP32, not an integer type"),
    "text_input as INT32": ({"text_input": ("INT32", [1, 1], np.int32(3).tobytes())},
                            "'text_input' is INT32, not BYTES"),
    "stream as INT32": ({"stream": ("INT32", [1, 1], np.int32(1).tobytes())}, "'stream' is INT32, not BOOL"),
    "elements overflowing int64": ({"text_input": ("BYTES", [2**32, 2**32], b"")},
                                   "0 elements do not fill shape [4294967296, 4294967296]"),
    "shape too big for numpy": ({"text_input": ("BYTES", [2**62, 0], b"")}, f"shape [{2**62}, 0] is too big"),
}


@pytest.mark.parametrize("case", sorted(WRONG_TENSORS))
def test_kserve_input_of_a_wrong_datatype_or_shape_is_invalid_argument(server, offline_engine, case):
    tensor, message = WRONG_TENSORS[case]
    with server.channel() as channel:
        stub = kserve_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(kserve_request(offline_engine.model_cfg.name,
                                           **{"text_input": PROMPT, "max_tokens": MAX_TOKENS, **tensor}))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert message in err.value.details()
        assert stub.ModelInfer(kserve_request(offline_engine.model_cfg.name, text_input=PROMPT,
                                              max_tokens=MAX_TOKENS)).raw_output_contents


def test_kserve_numbers_may_come_in_other_widths_but_not_out_of_range(server, offline_engine):
    name = offline_engine.model_cfg.name
    with server.channel() as channel:
        stub = kserve_pb2_grpc.GRPCInferenceServiceStub(channel)
        want = stub.ModelInfer(kserve_request(name, text_input=PROMPT, max_tokens=MAX_TOKENS,
                                              temperature=("FP32", [1, 1], np.float32(0).tobytes())))
        got = stub.ModelInfer(kserve_request(name, text_input=PROMPT, max_tokens=("UINT8", [1], np.uint8(3).tobytes()),
                                             temperature=("FP64", [1], np.float64(0).tobytes())))
        assert got.raw_output_contents == want.raw_output_contents
        typed = kpb.ModelInferRequest(model_name=name)  # typed contents, not raw bytes
        typed.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"Paris is")
        typed.inputs.add(name="max_tokens", datatype="INT8", shape=[1]).contents.int_contents.append(300)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(typed)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "out of the range of INT8" in err.value.details()
