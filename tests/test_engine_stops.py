"""The engine's request handling against vLLM v1's rules, on a scripted fake model and a
one-character-per-token tokenizer (no compilation): stop strings, stop tokens, min_tokens,
max_tokens and their finish reasons and text; aborts and failures; requests that cannot start."""

import types

import numpy as np
import pytest

from jaxinfer.engine.llm_engine import LLMEngine
from jaxinfer.errors import RequestError
from jaxinfer.runner.model_runner import SampledToken
from jaxinfer.sampling_params import SamplingParams

EOS = 0
LETTERS = "abcdefghijklmnopqrstuvwxyz"  # token i is LETTERS[i]; token 0 is the (special) eos
X = LETTERS.index("x")


class CharBackend:
    """The tokenizer's decoder: one character per token."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join("" if i == EOS and skip_special_tokens else LETTERS[i] for i in ids)


class CharTokenizer:
    """The engine's tokenizer interface over CharBackend."""

    eos_token_ids = (EOS,)

    def __init__(self):
        self.backend = CharBackend()

    def encode(self, text):
        return [LETTERS.index(c) for c in text]


decode = CharBackend().decode


class ScriptedRunner:
    """Samples token `scripts[request_id, sample index][k]` as a sample's k-th output token."""

    def __init__(self, num_blocks, scripts):
        self.num_blocks, self.scripts = num_blocks, scripts

    def execute(self, out, seed_of):
        steps = []
        for step in range(out.num_steps):
            steps.append([[self._token(e.seq.request_id, e.seq.seq_index + j, e.seq.num_output_tokens + step)
                           for j in range(e.num_samples)] for e in out.model_step(step).scheduled])
        return steps

    def _token(self, request_id, index, position):
        return SampledToken(self.scripts[request_id, index][position], 0.0, np.zeros(4, np.int32),
                            np.zeros(4, np.float32))


def make_engine(scripts=None, num_blocks=64, decode_steps=1):
    """An engine over ScriptedRunner: blocks of 4 tokens, up to 8 sequences and 64 tokens each."""
    engine_cfg = types.SimpleNamespace(block_size=4, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=64,
                                       decode_steps=decode_steps, decode_call_tokens=64)
    model_cfg = types.SimpleNamespace(vocab_size=len(LETTERS))
    return LLMEngine(ScriptedRunner(num_blocks, {} if scripts is None else scripts), CharTokenizer(), model_cfg,
                     engine_cfg)


def run_all(engine):
    """Steps until every request finished; returns the final outputs by id, with each sample's
    streamed deltas joined."""
    finished, streamed = {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            for c in out.outputs:
                streamed[out.request_id, c.index] = streamed.get((out.request_id, c.index), "") + c.delta_text
            if out.finished:
                finished[out.request_id] = out
    return finished, streamed


def vllm_sample(script, params, events):
    """(token ids, text, finish reason) of a vLLM v1 sample whose model draws `script`, one
    character per token. Its scheduler ends a sample on eos or a stop id once it has min_tokens
    tokens, else at max_tokens; its detokenizer leaves the stopping token's text out (unless
    include_stop_str_in_output) and matches stop strings ending in the text of tokens after the
    first min_tokens, cutting the text there. Adds to `events` the rules that applied."""
    tokens, text = [], ""
    for token in script:
        tokens.append(token)
        stop_token = len(tokens) >= params.min_tokens and (
            token in params.stop_token_ids or (token == EOS and not params.ignore_eos))
        searched = len(text)
        if stop_token and not params.include_stop_str_in_output:
            events.add("stop token text left out" if decode([token]) else "stop token")
        else:
            text += decode([token])
        hits = [(start + len(stop), start) for stop in params.stop for start in range(len(text))
                if text.startswith(stop, start) and start + len(stop) > searched]
        if hits and len(tokens) <= params.min_tokens:
            events.add("stop string before min_tokens")
        elif hits:
            end, start = min(hits)
            if len(tokens) == params.max_tokens:
                events.add("stop string on the last token")
            return tokens, text[:end if params.include_stop_str_in_output else start], "stop"
        if stop_token:
            return tokens, text, "stop"
        if len(tokens) == params.max_tokens:
            return tokens, text, "length"
    raise AssertionError("the script is shorter than max_tokens")


def random_params(rng):
    max_tokens = int(rng.integers(1, 11))
    stops = set()
    for _ in range(rng.integers(0, 3)):
        stops.add("".join(rng.choice(list("bcde"), rng.integers(1, 4))))
    # vLLM tries stop strings in list order, this engine takes the longest of those ending at the
    # same place: with no stop string a suffix of another, both rules agree.
    stops = [s for s in stops if not any(t != s and t.endswith(s) for t in stops)]
    return SamplingParams(
        n=int(rng.integers(1, 3)), max_tokens=max_tokens, min_tokens=int(rng.integers(0, max_tokens + 1)),
        stop=tuple(stops), stop_token_ids=tuple(int(t) for t in rng.choice([1, 2, 3, 4], rng.integers(0, 2))),
        ignore_eos=bool(rng.integers(0, 2)), include_stop_str_in_output=bool(rng.integers(0, 2)))


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_stops_min_tokens_and_lengths_follow_vllm(rng, decode_steps):
    """Random requests (one to three stop strings, a stop id, min_tokens, n = 2, eos) against what
    vLLM returns for the same sampled tokens: token ids, text (also as streamed), finish reason."""
    scripts, requests = {}, []
    for i in range(80):
        params = random_params(rng)
        for index in range(params.n):
            scripts[f"r{i}", index] = rng.choice(5, params.max_tokens, p=[0.05, 0.3, 0.25, 0.2, 0.2]).tolist()
        requests.append((f"r{i}", rng.integers(1, 26, rng.integers(1, 6)).tolist(), params))
    engine = make_engine(scripts, decode_steps=decode_steps)
    for request_id, prompt, params in requests:
        engine.add_request(request_id, prompt_token_ids=prompt, params=params)
    finished, streamed = run_all(engine)
    events = set()
    for request_id, _, params in requests:
        for c in finished[request_id].outputs:
            want = vllm_sample(scripts[request_id, c.index], params, events)
            assert (c.token_ids, c.text, c.finish_reason) == want, (request_id, c.index, params)
            assert streamed[request_id, c.index] == c.text
    assert events == {"stop string before min_tokens", "stop string on the last token",
                      "stop token text left out", "stop token"}, events
    assert engine.scheduler.block_manager.metrics().num_used_blocks == 0


def test_abort_and_failure_keep_the_text_held_back(rng):
    """Text held back for a possible stop string ("x" of "xy") is part of the output when the
    request ends otherwise: aborted, or failed by a KV pool too small for it."""
    letters = rng.integers(1, 5, 6).tolist()
    params = SamplingParams(max_tokens=20, stop=("xy",))
    engine = make_engine({("abort", 0): letters[:4] + [X] + [1] * 15})
    engine.add_request("abort", prompt_token_ids=[5, 6], params=params)
    for _ in range(5):
        engine.step()
    out = engine.abort("abort").outputs[0]
    assert (out.token_ids, out.text, out.finish_reason) == (letters[:4] + [X], decode(letters[:4]) + "x", "abort")

    # 2 usable blocks of 4 tokens: the 7th output token is the last the pool can hold.
    engine = make_engine({("fail", 0): letters + [X] + [1] * 13}, num_blocks=3)
    engine.add_request("fail", prompt_token_ids=[5, 6], params=params)
    finished, streamed = run_all(engine)
    out = finished["fail"]
    assert out.error and out.outputs[0].finish_reason == "abort"
    assert out.outputs[0].text == streamed["fail", 0] == decode(letters) + "x"


def test_a_request_that_cannot_start_leaves_nothing_behind(rng, monkeypatch):
    with pytest.raises(RequestError, match="stop"):
        SamplingParams(stop=("ok", b"x"))
    script = rng.integers(1, 26, 3).tolist()
    engine = make_engine({("r", 0): script})

    def broken_decode(ids, skip_special_tokens=True):
        raise RequestError("the tokenizer cannot decode this prompt")

    with monkeypatch.context() as patch:
        patch.setattr(engine.tokenizer.backend, "decode", broken_decode)
        with pytest.raises(RequestError, match="cannot decode"):
            engine.add_request("r", prompt_token_ids=[5, 6], params=SamplingParams(max_tokens=3))
    with pytest.raises(RequestError, match="max_num_seqs"):  # rejected by the scheduler
        engine.add_request("r", prompt_token_ids=[5, 6], params=SamplingParams(n=9, max_tokens=3))
    assert not engine.has_unfinished_requests() and engine.scheduler.num_unfinished_requests == 0
    engine.add_request("r", prompt_token_ids=[5, 6], params=SamplingParams(max_tokens=3, ignore_eos=True))
    assert run_all(engine)[0]["r"].outputs[0].token_ids == script


def test_request_checks_come_from_the_scheduler():
    """The scheduler's messages; a duplicate id with a text prompt is rejected before tokenizing."""
    engine = make_engine()
    with pytest.raises(RequestError, match="'e' has an empty prompt"):
        engine.add_request("e", prompt_token_ids=[])
    engine.add_request("r", prompt_token_ids=[1])
    with pytest.raises(RequestError, match="'r' is already in use"):
        engine.add_request("r", prompt_token_ids=[2])
    engine.tokenizer.encode = None  # not called
    with pytest.raises(RequestError, match="'r' is already in use"):
        engine.add_request("r", prompt="b")


def test_min_tokens_refuses_more_stop_ids_than_it_can_hold_back():
    from jaxinfer.runner.sampling import DEFAULT_SUPPRESS_LEN

    engine = make_engine()
    ids = tuple(range(1, DEFAULT_SUPPRESS_LEN + 1))  # with the eos, one more than fits
    with pytest.raises(RequestError, match=f"at most {DEFAULT_SUPPRESS_LEN} of them; this one has "
                                           f"{DEFAULT_SUPPRESS_LEN + 1}"):
        engine.add_request("r", "ab", SamplingParams(min_tokens=2, stop_token_ids=ids))
    assert not engine.has_unfinished_requests()
    engine.add_request("r", "ab", SamplingParams(min_tokens=2, stop_token_ids=ids, ignore_eos=True, max_tokens=3))
    engine.add_request("s", "ab", SamplingParams(stop_token_ids=ids + (9,), max_tokens=3))

