"""Batch-1 latency and small-batch decode rate of an in-process engine.

`ttft(engine, prompt_len, ...)`: median time to first token of single requests (distinct random
prompts, so the prefix cache never helps). `decode_rate(engine, batch, ...)`: tokens/s of
`batch` concurrent greedy requests once their prefill is done, `batch / mean TPOT`.
`roofline_ratio`: a batch-1 decode rate over the rate at which the device can stream the
weights once per token (copy bandwidth / weight bytes).
"""

from __future__ import annotations

import numpy as np

from jaxinfer.bench import roofline
from jaxinfer.bench.dataset import LengthRange, random_requests
from jaxinfer.bench.engine_runs import drive
from jaxinfer.engine.llm_engine import LLMEngine


def ttft(engine: LLMEngine, prompt_len: int, repeats: int, seed: int) -> float:
    requests = random_requests(repeats, LengthRange(prompt_len, prompt_len), LengthRange(1, 1),
                               engine.model_cfg.vocab_size, seed)
    return float(np.median([drive(engine, [r], [0.0])[0][0].ttft for r in requests]))


def decode_rate(engine: LLMEngine, batch: int, prompt_len: int, decode_tokens: int, seed: int) -> float:
    requests = random_requests(batch, LengthRange(prompt_len, prompt_len), LengthRange(decode_tokens, decode_tokens),
                               engine.model_cfg.vocab_size, seed)
    timings, _ = drive(engine, requests, [0.0] * batch)
    return batch / float(np.mean([t.tpot for t in timings]))


def weight_stream_rate(engine: LLMEngine, bandwidth_bytes_per_s: float) -> float:
    """Tokens/s at batch 1 if each token costs exactly one read of the weights at this bandwidth."""
    cfg = engine.engine_cfg
    return bandwidth_bytes_per_s / roofline.weight_bytes(engine.model_cfg, roofline.weight_element_bytes(cfg.dtype, cfg.quant))
