"""Incremental detokenization of a request's generated tokens, with stop strings.

`IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens, stop,
include_stop_str_in_output, min_tokens)` turns output token ids, fed in any chunks, into text pieces:

    add_tokens(ids: Sequence[int]) -> (new_text: str, stop_hit: str | None)
    finish() -> (new_text: str, stop_hit: str | None)    at the end of generation: flushes what
                                                         was held back (see below)
    text -> str                                          everything emitted so far

`tokenizer` is a HF `tokenizers.Tokenizer`, or anything with its `decode(ids,
skip_special_tokens=...)` (such as `jaxinfer.tokenizer.Tokenizer`). With a byte-level BPE one
character can span several tokens, so text is emitted only once it is stable: a decoded tail of
U+FFFD may be an incomplete UTF-8 sequence that later bytes complete, and is held until a stable
character follows it (or `finish`). The emitted pieces, joined, equal
`tokenizer.decode(output_ids)` whenever the prompt ends on a character boundary; the last few
prompt tokens are decoded with the first output tokens only as context, for decoders that treat
the start of a sequence specially (a SentencePiece space prefix).

Stop strings are matched on the decoded text across token boundaries. The first occurrence to
*end* wins (ties: the longest), which makes the result independent of how tokens are chunked.
Text that could be the start of a stop string is held back until decided; on a hit the output is
cut before the stop string, or after it with `include_stop_str_in_output`, and the detokenizer is
done: further `add_tokens` calls are an error. As in vLLM, a stop string counts only when it ends
in the text of an output token after the first `min_tokens` (it may start earlier).
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxinfer.errors import EngineError, RequestError

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded with the output as context; enough for any decoder's start-of-text rule.
_CONTEXT_TOKENS = 5


class _StableTextDecoder:
    """Decodes a growing token sequence through a sliding window, returning only stable text.

    The window starts at `prefix_offset`, a token boundary that is also a character boundary;
    `prefix_text` is the decoded text of tokens [prefix_offset, read_offset), already returned.
    Each call decodes only the window, so the cost per token does not grow with the output.
    """

    def __init__(self, tokenizer, context_ids: Sequence[int], skip_special_tokens: bool):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = list(context_ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(0, self._read_offset)
        self._returned_past_prefix = 0  # chars after prefix_text already returned from a held window

    def add(self, token_ids: Sequence[int]) -> str:
        self._ids.extend(int(t) for t in token_ids)
        text = self._decode(self._prefix_offset, len(self._ids))
        stable = text.rstrip(_REPLACEMENT)
        new_text = stable[len(self._prefix_text) + self._returned_past_prefix:]
        if len(stable) < len(text):
            # A trailing U+FFFD may still become a character: keep the window, remember what we gave.
            self._returned_past_prefix += len(new_text)
        else:
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
            self._returned_past_prefix = 0
        return new_text

    def flush(self) -> str:
        """Everything not returned yet, including a tail of U+FFFD that no byte will complete now."""
        text = self._decode(self._prefix_offset, len(self._ids))
        return text[len(self._prefix_text) + self._returned_past_prefix:]

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special_tokens)


class IncrementalDetokenizer:
    """Output token ids -> stable text pieces, cut at the first stop string; see the module docstring."""

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True,
                 stop: Sequence[str] = (), include_stop_str_in_output: bool = False, min_tokens: int = 0):
        if isinstance(stop, str):
            stop = (stop,)
        if not all(isinstance(s, str) and s for s in stop):
            raise RequestError(f"stop strings must be non-empty strings; got {list(stop)!r}")
        self._decoder = _StableTextDecoder(tokenizer, list(prompt_token_ids)[-_CONTEXT_TOKENS:], skip_special_tokens)
        self._stop = tuple(stop)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens
        self._num_tokens = 0  # output tokens fed so far
        self._text = ""     # all stable text decoded so far (cut at a stop string once hit)
        self._emitted = 0   # how much of it has been returned
        self._done = False

    @property
    def text(self) -> str:
        """The output text emitted so far."""
        return self._text[:self._emitted]

    def add_tokens(self, token_ids: Sequence[int]) -> tuple[str, str | None]:
        """Feeds newly generated tokens; returns the text that became final and the stop string hit."""
        self._check_open()
        token_ids = list(token_ids)
        # A chunk that crosses min_tokens is decoded in two parts, so that the stop search starts
        # exactly at the text of token min_tokens + 1 however the tokens are chunked.
        quiet = min(len(token_ids), max(0, self._min_tokens - self._num_tokens))
        text, hit = "", None
        for part in (token_ids[:quiet], token_ids[quiet:]):
            if part and hit is None:
                self._num_tokens += len(part)
                piece, hit = self._advance(self._decoder.add(part), final=False)
                text += piece
        return text, hit

    def finish(self) -> tuple[str, str | None]:
        """Ends the output (max_tokens, eos, abort): returns all held-back text, cut at a stop string."""
        self._check_open()
        return self._advance(self._decoder.flush(), final=True)

    def _check_open(self) -> None:
        if self._done:
            raise EngineError("this detokenizer already finished (stop string hit or finish() called); "
                              "create a new one per output sequence")

    def _advance(self, stable_text: str, final: bool) -> tuple[str, str | None]:
        searched = len(self._text)
        self._text += stable_text
        hit = self._first_stop(searched) if self._num_tokens > self._min_tokens else None
        if hit is not None:
            start, stop = hit
            self._text = self._text[:start + len(stop) if self._include_stop else start]
            self._done = True
            return self._emit(len(self._text)), stop
        self._done = final
        held = 0 if final or self._include_stop else self._stop_prefix_suffix_length()
        return self._emit(len(self._text) - held), None

    def _emit(self, end: int) -> str:
        piece = self._text[self._emitted:end]
        self._emitted = end
        return piece

    def _first_stop(self, searched: int) -> tuple[int, str] | None:
        """(start, stop string) of the occurrence ending after text[:searched] that ends first; ties
        go to the longer one. text[:searched] may hold occurrences that min_tokens ruled out."""
        occurrences = [(start + len(stop), start, stop) for stop in self._stop
                       if (start := self._text.find(stop, max(0, searched - len(stop) + 1))) >= 0]
        if not occurrences:
            return None
        _, start, stop = min(occurrences)
        return start, stop

    def _stop_prefix_suffix_length(self) -> int:
        """Length of the longest not-yet-emitted suffix that is a proper prefix of a stop string."""
        longest = min(self._longest_stop - 1, len(self._text) - self._emitted)
        for length in range(longest, 0, -1):
            suffix = self._text[-length:]
            if any(stop.startswith(suffix) for stop in self._stop):
                return length
        return 0
