"""The sampling options `jaxinfer generate`, `jaxinfer client` and `jaxinfer bench throughput|serve`
share: their flags, and the values a user gave (an option left out keeps the default of whoever
samples: configs/defaults.yaml for `generate`, the server's for `client`, greedy for `bench`)."""

from __future__ import annotations

import argparse
from typing import Any

SAMPLING_OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "seed")
# What `jaxinfer bench` lets a workload sample with (its lengths and seed are the workload's own).
BENCH_SAMPLING_OPTIONS = ("temperature", "top_p", "top_k")


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens_default: object, temperature_default: object,
                      options: tuple[str, ...] = SAMPLING_OPTIONS) -> None:
    """The flags of `options` (SamplingParams field names), all None when not given; the defaults
    are for the help text."""
    flags = {
        "max_tokens": dict(type=int, help=f"tokens to generate (default: {max_tokens_default})"),
        "temperature": dict(type=float, help=f"0 is greedy (default: {temperature_default})"),
        "top_p": dict(type=float, help="keep the most likely tokens up to this probability mass (default 1: all)"),
        "top_k": dict(type=int, help="keep the k most likely tokens (default -1: all)"),
        "seed": dict(type=int, help="sampling seed, for reproducible sampled text"),
    }
    for name in options:
        parser.add_argument(f"--{name.replace('_', '-')}", **flags[name])


def given_sampling_options(args: argparse.Namespace, options: tuple[str, ...] = SAMPLING_OPTIONS) -> dict[str, Any]:
    """The sampling options of `options` given on the command line, by SamplingParams field name."""
    return {name: getattr(args, name) for name in options if getattr(args, name) is not None}
