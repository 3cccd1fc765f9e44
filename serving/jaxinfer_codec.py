"""Translation between jaxinfer.v1 messages and the engine: prompts, sampling parameters, outputs.

Pure functions (no I/O): GenerateRequest -> prompt token ids + SamplingParams, and
RequestOutput -> GenerateResponse (streamed deltas or the cumulative final reply).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxinfer.engine.outputs import CompletionOutput, RequestOutput
from jaxinfer.errors import RequestError
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.tokenizer import Tokenizer
from serving.protos import jaxinfer_pb2 as pb

_OPTIONAL_SAMPLING_FIELDS = ("n", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                             "presence_penalty", "frequency_penalty", "seed", "max_tokens", "min_tokens",
                             "ignore_eos", "logprobs", "include_stop_str_in_output")
FINISH_REASONS = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP,
                  "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}


def make_sampling_params(fields: Mapping[str, Any], max_n: int, vocab_size: int) -> SamplingParams:
    """SamplingParams from the fields a client set (others keep their defaults), plus the
    server's limits that SamplingParams does not know: n and stop token ids."""
    params = SamplingParams(**fields)
    if params.n > max_n:
        raise RequestError(f"invalid sampling parameter n={params.n}: this server runs at most {max_n} "
                           "sequences at once; lower n")
    bad = [t for t in params.stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"stop_token_ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    return params


def sampling_params(message: pb.SamplingParameters, max_n: int, vocab_size: int) -> SamplingParams:
    fields: dict[str, Any] = {name: getattr(message, name) for name in _OPTIONAL_SAMPLING_FIELDS
                              if message.HasField(name)}
    fields["stop"] = tuple(message.stop)
    fields["stop_token_ids"] = tuple(message.stop_token_ids)
    return make_sampling_params(fields, max_n, vocab_size)


def chat_text(chat: pb.ChatMessages, tokenizer: Tokenizer) -> str:
    if not chat.messages:
        raise RequestError("chat has no messages; send at least one {role, content} message")
    return tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in chat.messages])


def check_prompt(token_ids: list[int]) -> list[int]:
    if not token_ids:
        raise RequestError("the prompt is empty; send text, token ids or chat messages with content")
    return token_ids


def prompt_token_ids(request: pb.GenerateRequest, tokenizer: Tokenizer) -> list[int]:
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise RequestError("the request has no prompt; set one of text, token_ids or chat")
    if kind == "token_ids":
        return check_prompt(list(request.token_ids.ids))
    text = request.text if kind == "text" else chat_text(request.chat, tokenizer)
    return check_prompt(tokenizer.encode(text) if text else [])


def _completion(completion: CompletionOutput, cumulative: bool) -> pb.Completion:
    token_ids = completion.token_ids if cumulative else completion.delta_token_ids
    message = pb.Completion(index=completion.index, text=completion.text if cumulative else completion.delta_text,
                            token_ids=token_ids, finish_reason=FINISH_REASONS[completion.finish_reason])
    if completion.logprobs is not None and token_ids:
        # One logprobs entry per generated token: this message's tokens are the last ones.
        for position in completion.logprobs[-len(token_ids):]:
            message.logprobs.add().entries.extend(
                pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in position.items())
    return message


def generate_response(output: RequestOutput, cumulative: bool) -> pb.GenerateResponse:
    """The message for one engine output: the samples that changed (deltas), or with
    `cumulative` every sample's whole text; usage once the request is finished."""
    completions = [c for c in output.outputs
                   if cumulative or output.finished or c.delta_token_ids or c.delta_text]
    response = pb.GenerateResponse(request_id=output.request_id, finished=output.finished,
                                   outputs=[_completion(c, cumulative) for c in completions])
    if output.finished:
        response.usage.CopyFrom(pb.Usage(prompt_tokens=len(output.prompt_token_ids),
                                         completion_tokens=output.num_generated_tokens,
                                         cached_tokens=output.num_cached_tokens))
    return response
