"""`jaxinfer generate`: stream a completion of one prompt to stdout (logs go to stderr)."""

from __future__ import annotations

import sys

from jaxinfer.configs import load_config
from jaxinfer.engine.create import is_engine_dir
from jaxinfer.errors import EngineError
from jaxinfer.llm import LLM
from jaxinfer.sampling_params import SamplingParams


def main(args) -> None:
    defaults = load_config("defaults")
    if args.quant and is_engine_dir(args.model):
        raise EngineError(f"{args.model} is a built engine, whose quantization was fixed at build: drop --quant, "
                          f"or build one with `jaxinfer build --quant {args.quant}`")
    # One request at a time: an engine of two buckets (decode, and 64-token prefill chunks) compiles
    # fastest. A built engine directory ignores these and loads its own buckets.
    llm = LLM(args.model, dtype=args.dtype, tp=args.tp, quant=args.quant, max_num_seqs=1,
              max_num_batched_tokens=64, min_token_bucket=64)
    prompt = llm.chat_prompt(args.chat) if args.chat is not None else args.prompt
    params = SamplingParams(
        max_tokens=args.max_tokens or defaults["max_tokens"],
        temperature=defaults["temperature"] if args.temperature is None else args.temperature,
        top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    for text in llm.stream(prompt, params):
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
