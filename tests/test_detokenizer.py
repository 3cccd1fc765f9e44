"""IncrementalDetokenizer against whole-sequence decoding, with a byte-level BPE trained here."""

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxinfer.detokenizer import IncrementalDetokenizer
from jaxinfer.errors import EngineError, RequestError

CORPUS = [
    "Hello world, the quick brown fox jumps over the lazy dog. " * 3,
    "你好，世界！今天天气很好。我们去公园散步吧。", "こんにちは世界、元気ですか",
    "Emoji: 😀😃🎉🚀👍🏽 ❤️ café naïve Ünïcödé",
    "User: hello\nAssistant: hi there\n\nUser: bye\n",
]
TEXTS = [
    "Hello 你好，世界！😀 the fox 🎉🚀 jumps\n\nUser: café 👍🏽 done",
    "こんにちは😃 lazy dog ❤️ naïve 公园散步 User: bye",
]
SPECIAL = "<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE: characters outside its merges split into several byte tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[SPECIAL], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def random_chunks(rng, ids):
    cuts = np.sort(rng.choice(np.arange(1, len(ids)), size=rng.integers(0, len(ids) // 2), replace=False))
    return [list(c) for c in np.split(np.asarray(ids), cuts)]


def run(detok, chunks):
    """Feeds chunks; returns the pieces (finish's last) and the stop hit, checking the
    text property along the way."""
    pieces, hit = [], None
    for chunk in chunks:
        piece, hit = detok.add_tokens(chunk)
        pieces.append(piece)
        if hit is not None:
            break
    else:
        piece, hit = detok.finish()
        pieces.append(piece)
    assert detok.text == "".join(pieces)
    return pieces, hit


def visible_oracle(tokenizer, ids, stops, include_stop, skip_special_tokens=True):
    """What should have been emitted after `ids` when no stop string has been hit yet: the decoded
    text without its trailing U+FFFD, less its longest suffix that begins a stop string."""
    stable = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens).rstrip("\ufffd")
    if include_stop:
        return stable
    for length in range(min(len(stable), max(map(len, stops), default=1) - 1), 0, -1):
        if any(s.startswith(stable[-length:]) for s in stops):
            return stable[:-length]
    return stable


def final_oracle(text, stops, include_stop):
    """(expected output, stop hit): cut at the occurrence that ends first, ties to the longest."""
    occurrences = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if not occurrences:
        return text, None
    end, start, stop = min(occurrences)
    return text[:end if include_stop else start], stop


def test_real_text_streams_whole_characters_only(tokenizer):
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        assert any("\ufffd" in tokenizer.decode([i]) for i in ids), "the text must split characters"
        detok = IncrementalDetokenizer(tokenizer, [])
        pieces, hit = run(detok, [[i] for i in ids])
        assert hit is None and "".join(pieces) == text
        assert not any("\ufffd" in piece for piece in pieces)
        emitted = ""
        for i, piece in enumerate(pieces[:-1]):
            emitted += piece
            assert emitted == visible_oracle(tokenizer, ids[:i + 1], (), False), i


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_token_sequences_match_whole_decoding(tokenizer, skip_special_tokens):
    """Random ids (lone continuation bytes, split emoji, the special token): every emitted prefix
    is final and the pieces add up to decode(ids)."""
    rng = np.random.default_rng(0)
    vocab = tokenizer.get_vocab_size()
    for _ in range(60):
        ids = [int(t) for t in rng.integers(0, vocab, rng.integers(2, 40))]
        chunks = random_chunks(rng, ids)
        detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip_special_tokens)
        pieces, _ = run(detok, chunks)
        whole = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(pieces) == whole
        emitted, fed = "", 0
        for chunk, piece in zip(chunks, pieces):
            emitted += piece
            fed += len(chunk)
            assert emitted == visible_oracle(tokenizer, ids[:fed], (), False, skip_special_tokens), ids[:fed]


def test_prompt_is_context_only(tokenizer):
    prompt = tokenizer.encode("User: hello 你好\nAssistant:").ids
    output = tokenizer.encode(" hi 😀 there").ids
    pieces, _ = run(IncrementalDetokenizer(tokenizer, prompt), [[i] for i in output])
    assert "".join(pieces) == tokenizer.decode(output)


def test_prompt_context_keeps_a_sentencepiece_leading_space():
    """A Metaspace decoder drops the space of a sequence's first word; mid-text it must stay."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS[:1], trainers.BpeTrainer(vocab_size=120, show_progress=False))
    prompt, output = tok.encode("Hello world,").ids, tok.encode("the lazy dog").ids
    pieces, _ = run(IncrementalDetokenizer(tok, prompt), [[i] for i in output])
    assert "".join(pieces) == tok.decode(prompt + output)[len(tok.decode(prompt)):] == " the lazy dog"


def stops_across_boundaries(rng, tokenizer, ids, count):
    """Substrings of the decoded text that span at least one token boundary."""
    text = tokenizer.decode(ids)
    boundaries = np.cumsum([len(tokenizer.decode(ids[:i + 1])) - len(tokenizer.decode(ids[:i]))
                            for i in range(len(ids))])
    stops = []
    while len(stops) < count:
        start = int(rng.integers(0, len(text) - 2))
        end = start + int(rng.integers(2, 7))
        if end <= len(text) and any(start < b < end for b in boundaries):
            stops.append(text[start:end])
    return stops


@pytest.mark.parametrize("include_stop", [False, True])
def test_stop_strings_across_tokens(tokenizer, include_stop):
    rng = np.random.default_rng(1)
    for trial in range(40):
        ids = tokenizer.encode(TEXTS[trial % len(TEXTS)]).ids
        stops = stops_across_boundaries(rng, tokenizer, ids, int(rng.integers(1, 4)))
        if trial % 5 == 0:
            stops.append("never in the text")
        want, want_hit = final_oracle(tokenizer.decode(ids), stops, include_stop)
        for chunks in ([[i] for i in ids], random_chunks(rng, ids)):
            detok = IncrementalDetokenizer(tokenizer, [], stop=stops, include_stop_str_in_output=include_stop)
            pieces, hit = [], None
            fed = 0
            for chunk in chunks:
                piece, hit = detok.add_tokens(chunk)
                pieces.append(piece)
                fed += len(chunk)
                if hit is not None:
                    break
                assert "".join(pieces) == visible_oracle(tokenizer, ids[:fed], stops, include_stop), (stops, fed)
            assert hit == want_hit, stops
            assert "".join(pieces) == want, stops


def test_no_stop_hit_flushes_held_text_at_finish(tokenizer):
    ids = tokenizer.encode("the lazy dog\n\nUs").ids
    detok = IncrementalDetokenizer(tokenizer, [], stop=["\n\nUser:"])
    streamed = "".join(detok.add_tokens([i])[0] for i in ids)
    assert streamed == "the lazy dog"
    assert detok.finish() == ("\n\nUs", None)
    with pytest.raises(EngineError, match="already finished"):
        detok.add_tokens([1])


def test_stop_string_rules(tokenizer):
    def final(text, stops, include=False):
        """The result, the same whether tokens come one by one or all at once."""
        ids = tokenizer.encode(text).ids
        results = set()
        for chunks in ([[i] for i in ids], [ids]):
            pieces, hit = run(IncrementalDetokenizer(tokenizer, [], stop=stops, include_stop_str_in_output=include),
                              chunks)
            results.add(("".join(pieces), hit))
        assert len(results) == 1, results
        return results.pop()

    assert final("the fox jumps", ["fox jumps", "x"]) == ("the fo", "x")  # ends first wins
    assert final("the fox jumps", ["fox", "ox"]) == ("the ", "fox")  # same end: the longer one
    assert final("the fox jumps", ["the"], include=True) == ("the", "the")
    assert final("你好世界", ["好世"]) == ("你", "好世")
    with pytest.raises(RequestError, match="non-empty"):
        IncrementalDetokenizer(tokenizer, [], stop=["ok", ""])


def test_min_tokens_rules_out_earlier_stop_strings(tokenizer, rng):
    """As in vLLM, a stop string counts only when it ends in the text of a token after the first
    min_tokens (it may start before), whether tokens come one by one or in random chunks."""
    num_ruled_out = 0
    for trial in range(40):
        ids = tokenizer.encode(TEXTS[trial % len(TEXTS)]).ids
        stops = stops_across_boundaries(rng, tokenizer, ids, int(rng.integers(1, 4)))
        min_tokens, include = int(rng.integers(0, len(ids) + 1)), bool(rng.integers(0, 2))
        text = tokenizer.decode(ids)
        quiet_end = len(tokenizer.decode(ids[:min_tokens]).rstrip("\ufffd"))
        occurrences = [(start + len(s), -len(s), start, s) for s in stops for start in range(len(text))
                       if text.startswith(s, start)]
        counted = [o for o in occurrences if o[0] > quiet_end and len(ids) > min_tokens]
        num_ruled_out += len(counted) < len(occurrences)
        if counted:
            end, _, start, stop = min(counted)
            want = (text[:end if include else start], stop)
        else:
            want = (text, None)
        for chunks in ([[i] for i in ids], random_chunks(rng, ids)):
            detok = IncrementalDetokenizer(tokenizer, [], stop=stops, include_stop_str_in_output=include,
                                           min_tokens=min_tokens)
            pieces, hit = run(detok, chunks)
            assert ("".join(pieces), hit) == want, (stops, min_tokens, include)
    assert num_ruled_out > 5
