"""The `jaxinfer` command line: generate, build, serve, client, bench, roofline, eval.

Each subcommand lives with the code it drives; this module only parses arguments and dispatches.
Generated text goes to stdout; logs and progress go to stderr.
"""

from __future__ import annotations

import argparse
import sys

from jaxinfer.commands.arg_types import existing_file, non_negative, port, positive
from jaxinfer.commands.bench import add_bench_parsers, add_prefix_caching_arg
from jaxinfer.commands.eval import add_eval_parsers
from jaxinfer.commands.sampling_args import add_sampling_args
from jaxinfer.configs import load_config
from jaxinfer.engine.config import DTYPES, KV_DTYPES
from jaxinfer.errors import JaxinferError
from jaxinfer.quant.apply import QUANT_MODES
from jaxinfer.sampling_params import SamplingParams


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="HF checkpoint directory, .gguf file or built engine directory "
                                        "(default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", choices=list(DTYPES),
                        help="engine dtype (default: configs/defaults.yaml, bfloat16; float32 for quantized "
                             "engines on CPU)")
    parser.add_argument("--tp", type=int, help="tensor-parallel size")


def _parser() -> argparse.ArgumentParser:
    engine_defaults, run_defaults = load_config("engine"), load_config("defaults")
    parser = argparse.ArgumentParser(prog="jaxinfer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate text from a prompt, streamed to stdout")
    _add_model_args(generate)
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="raw prompt text")
    prompt.add_argument("--chat", help="a user message, rendered with the model's chat template")
    add_sampling_args(generate, run_defaults["max_tokens"], run_defaults["temperature"])
    generate.add_argument("--quant", choices=list(QUANT_MODES),
                          help="quantize a checkpoint's weights on the fly (w4a8 decodes fastest on CPU)")
    generate.set_defaults(run="jaxinfer.commands.generate:main")

    build = commands.add_parser("build", help="compile an engine directory ahead of time")
    _add_model_args(build)
    build.add_argument("--output", required=True, help="engine directory to write")
    build.add_argument("--kv-dtype", choices=["auto", *KV_DTYPES],
                       help="K/V cache dtype (auto: the engine's dtype; bfloat16 for quantized engines on CPU)")
    build.add_argument("--max-num-seqs", type=int,
                       help=f"sequences per step, the largest decode batch (default {engine_defaults['max_num_seqs']})")
    build.add_argument("--max-num-batched-tokens", type=int,
                       help="tokens per step, the prefill chunk budget "
                            f"(default {engine_defaults['max_num_batched_tokens']})")
    build.add_argument("--max-model-len", type=int,
                       help=f"longest prompt plus output (default {engine_defaults['max_model_len']})")
    build.add_argument("--block-size", type=int,
                       help=f"tokens per KV cache block (default {engine_defaults['block_size']})")
    build.add_argument("--kv-memory", help="KV pool size, e.g. 1GiB, or a fraction of device memory, e.g. 0.9 "
                                           f"(default {engine_defaults['kv_memory']})")
    build.add_argument("--quant", choices=list(QUANT_MODES), help="quantize the weights (w4a8 decodes fastest on CPU)")
    build.add_argument("--decode-steps", type=int, help="model steps per decode-only call (1: one step a call; "
                                                        f"default {engine_defaults['decode_steps']})")
    build.add_argument("--buckets-per-doubling", type=int,
                       help="compiled shapes per doubling of the token and sequence ladders (2: 16, 24, 32, 48, ...; "
                            f"default {engine_defaults['buckets_per_doubling']})")
    build.set_defaults(run="jaxinfer.engine.build:main")

    serve = commands.add_parser("serve", help="serve an engine over gRPC (jaxinfer.v1, KServe v2, health, metrics)")
    serve.add_argument("engine_dir", nargs="?", help="engine directory, HF checkpoint or .gguf (default: build "
                                                     "the default model's engine once and serve it)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=port, default=50051, help="0 picks a free port")
    serve.add_argument("--metrics-port", type=port, help="Prometheus metrics over HTTP on this port")
    serve.add_argument("--tls-cert", type=existing_file, help="PEM certificate chain: serve over TLS (with --tls-key)")
    serve.add_argument("--tls-key", type=existing_file, help="PEM private key of --tls-cert")
    serve.add_argument("--auth-token-file", type=existing_file, help="require `authorization: Bearer <token>` metadata")
    serve.add_argument("--served-model-name", help="model name in replies and metrics (default: the checkpoint's)")
    serve.add_argument("--max-queued-requests", type=positive(int), default=256,
                       help="requests held at once, running or waiting; more are refused as RESOURCE_EXHAUSTED")
    serve.add_argument("--drain-timeout", type=non_negative(float), default=30.0,
                       help="seconds to finish requests on SIGTERM")
    add_prefix_caching_arg(serve)
    serve.set_defaults(run="jaxinfer.commands.serve:main")

    client = commands.add_parser("client", help="stream a reply from a running `jaxinfer serve`")
    client.add_argument("--address", default="127.0.0.1:50051", help="HOST:PORT of the server")
    message = client.add_mutually_exclusive_group(required=True)
    message.add_argument("--prompt", help="raw prompt text")
    message.add_argument("--chat", help="a user message, rendered with the served model's chat template")
    add_sampling_args(client, f"the server's, {SamplingParams.max_tokens}",
                      f"the server's, {SamplingParams.temperature}")
    client.add_argument("--tls-ca", type=existing_file, help="PEM CA certificate: connect over TLS, trusting it")
    client.add_argument("--auth-token-file", type=existing_file, help="file holding the server's bearer token")
    client.add_argument("--timeout", type=positive(float),
                        help="seconds before the request is abandoned (gRPC deadline)")
    client.set_defaults(run="jaxinfer.commands.client:main")

    add_bench_parsers(commands)
    add_eval_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    module_name, function_name = args.run.split(":")
    try:
        # Importing a command's modules reads the CPU's kernel builds, which JAXINFER_CPU_ISA can refuse.
        module = __import__(module_name, fromlist=[function_name])
        return getattr(module, function_name)(args) or 0
    except JaxinferError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
