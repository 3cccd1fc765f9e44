"""Batch-1 latency and small-batch decode rate of an in-process engine.

`ttft(engine, prompt_len, ...)`: median time to first token of single requests (distinct random
prompts, so the prefix cache never helps). `decode_rate(engine, batch, ...)`: tokens/s of
`batch` concurrent greedy requests while all of them decode (`all_decoding_rate`), after prompts of
`prompt_len` tokens (the context each decode step reads): the median of `repeats` such runs.
`bandwidth_roofline`: the batch-1 roofline, tokens/s if each token read its weights once (the bytes
they take as stored, `streamed_weight_bytes`) and the K/V of its context, at the copy bandwidth.
`decode_roofline`: the same step at any batch on a device with a matmul rate too
(jaxinfer.bench.roofline): the bytes as here, the FLOPs as the roofline calculator counts them.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from jaxinfer.bench.dataset import LengthRange, random_requests
from jaxinfer.bench.engine_runs import drive
from jaxinfer.bench.metrics import RequestTiming
from jaxinfer.bench.roofline import Device, StepEstimate, decode_flops_per_token
from jaxinfer.cache.kv_pool import LayerKVCache
from jaxinfer.engine.llm_engine import LLMEngine
from jaxinfer.errors import RequestError
from jaxinfer.quant.apply import weight_bytes


def ttft(engine: LLMEngine, prompt_len: int, repeats: int, seed: int, vocab_size: int | None = None) -> float:
    """`vocab_size` bounds the prompts' token ids (default: the engine's), so that engines of two
    vocabularies can get the same prompts."""
    requests = random_requests(repeats, LengthRange(prompt_len, prompt_len), LengthRange(1, 1),
                               vocab_size or engine.model_cfg.vocab_size, seed)
    return float(np.median([drive(engine, [r], [0.0])[0][0].ttft for r in requests]))


def decode_rate(engine: LLMEngine, batch: int, prompt_len: int, decode_tokens: int, repeats: int, seed: int,
                vocab_size: int | None = None) -> float:
    """`vocab_size` as in `ttft`."""
    requests = random_requests(batch * repeats, LengthRange(prompt_len, prompt_len),
                               LengthRange(decode_tokens, decode_tokens), vocab_size or engine.model_cfg.vocab_size,
                               seed)
    return float(np.median([all_decoding_rate(drive(engine, requests[i:i + batch], [0.0] * batch)[0])
                            for i in range(0, len(requests), batch)]))


def all_decoding_rate(timings: Sequence[RequestTiming]) -> float:
    """Tokens/s delivered between the last request's first token and the first request's last: a
    window in which every step decodes all the requests and no prefill chunk (for one request,
    1 / TPOT)."""
    start = max(t.chunk_times[0] for t in timings)
    end = min(t.chunk_times[-1] for t in timings)
    if end <= start:
        raise RequestError(f"no time in which all {len(timings)} requests decoded together: one finished before "
                           "another's prefill was done; ask for more decode tokens (--decode-tokens)")
    tokens = sum(n for t in timings for time, n in zip(t.chunk_times, t.chunk_tokens) if start < time <= end)
    return tokens / (end - start)


def streamed_weight_bytes(params) -> int:
    """Bytes of the engine's weights one decode token reads: every parameter as it is stored
    (quantized layers and head in their format with their scales, norms in the engine dtype),
    except an embedding table that is not the head (untied, or tied with a quantized copy as the
    head), of which the lookup reads only a column per token."""
    lookup_only = params["embed"] if "lm_head" in params else None
    return weight_bytes(params) - (0 if lookup_only is None else weight_bytes(lookup_only))


def kv_bytes_per_position(caches: Sequence[LayerKVCache]) -> float:
    """Bytes of K/V (with their scales, when quantized) one position of context holds in these
    layers' pools."""
    return sum(leaf.nbytes for leaf in jax.tree.leaves(caches)) / (caches[0].num_blocks * caches[0].block_size)


def token_bytes(engine: LLMEngine, context: int = 0, batch: int = 1) -> float:
    """Bytes a decode step of `batch` sequences reads: its weights once, and each sequence's K/V of
    `context` positions."""
    return (streamed_weight_bytes(engine.runner.params)
            + batch * context * kv_bytes_per_position(engine.runner.kv_caches))


def bandwidth_roofline(engine: LLMEngine, bandwidth_bytes_per_s: float, context: int = 0) -> float:
    """Tokens/s at batch 1 if each token costs exactly one read of its weights, and of the K/V of
    `context` positions, at this bandwidth."""
    return bandwidth_bytes_per_s / token_bytes(engine, context)


def decode_roofline(engine: LLMEngine, device: Device, batch: int, context: int) -> StepEstimate:
    """A decode step of `batch` sequences at `context` positions on `device`: `token_bytes` moved,
    and each sequence's token's FLOPs."""
    return device.estimate(batch * decode_flops_per_token(engine.model_cfg, context),
                           token_bytes(engine, context, batch))
