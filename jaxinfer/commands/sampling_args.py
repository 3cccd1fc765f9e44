"""The sampling options `jaxinfer generate` and `jaxinfer client` share: their flags, and the values
a user gave (an option left out keeps the default of whoever samples: configs/defaults.yaml for
`generate`, the server's for `client`)."""

from __future__ import annotations

import argparse
from typing import Any

SAMPLING_OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "seed")


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens_default: object, temperature_default: object) -> None:
    """--max-tokens, --temperature, --top-p, --top-k and --seed, all None when not given; the defaults are
    for the help text."""
    parser.add_argument("--max-tokens", type=int, help=f"tokens to generate (default: {max_tokens_default})")
    parser.add_argument("--temperature", type=float, help=f"0 is greedy (default: {temperature_default})")
    parser.add_argument("--top-p", type=float, help="keep the most likely tokens up to this probability mass "
                                                    "(default 1: all)")
    parser.add_argument("--top-k", type=int, help="keep the k most likely tokens (default -1: all)")
    parser.add_argument("--seed", type=int, help="sampling seed, for reproducible sampled text")


def given_sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling options given on the command line, by SamplingParams field name."""
    return {name: getattr(args, name) for name in SAMPLING_OPTIONS if getattr(args, name) is not None}
