"""`jaxinfer generate`: stream a completion of one prompt to stdout (logs go to stderr)."""

from __future__ import annotations

import sys

from jaxinfer.commands.sampling_args import given_sampling_options
from jaxinfer.configs import load_config
from jaxinfer.engine.create import refuse_build_options
from jaxinfer.llm import LLM
from jaxinfer.sampling_params import SamplingParams


def main(args) -> None:
    defaults = load_config("defaults")
    refuse_build_options(args.model, dtype=args.dtype, tp=args.tp, quant=args.quant)
    params = SamplingParams(**{"max_tokens": defaults["max_tokens"], "temperature": defaults["temperature"],
                               **given_sampling_options(args)})
    # One request at a time: an engine of two buckets (decode, and 64-token prefill chunks) compiles
    # fastest. A built engine directory loads its own buckets instead, in the background.
    llm = LLM(args.model, background=True, dtype=args.dtype, tp=args.tp, quant=args.quant, max_num_seqs=1,
              max_num_batched_tokens=64, min_token_bucket=64)
    prompt = llm.chat_prompt(args.chat) if args.chat is not None else args.prompt
    for text in llm.stream(prompt, params):
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
