"""`jaxinfer bench throughput|latency|compare|serve`: measured like the field, baselines in the same run.

throughput  offline: the whole workload submitted at once; requests/s, input/output tokens/s
latency     batch-1 TTFT per prompt length, decode tokens/s per batch size, roofline ratio
compare     an A/B of two engines in one process: latency's figures in alternating rounds
serve       timed arrivals (Poisson/gamma at --request-rate, from at most --max-concurrency clients;
            or a closed loop of --concurrency) against a gRPC server (--target, with --tls-ca and
            --auth-token-file) or an in-process engine; TTFT/TPOT/ITL/E2E percentiles, goodput,
            failed requests

Workloads (throughput, serve): random lengths (--input-len, --output-len) with optional shared
prefixes (--prefix-len, --num-prefixes), or a --dataset of prompts or ShareGPT conversations;
greedy unless --temperature, --top-p, --top-k; --save-detailed keeps every request's record in the JSON.

Baselines (`--baseline`, repeatable): `static` (the same compiled engine, fixed-size batches, padded
prompts, that wait for their longest member), `hf` (HF transformers generate in the --hf-python env) and
`llamacpp` (llama.cpp through llama-cpp-python in the --llamacpp-python env, on the GGUF file);
jaxinfer.bench.baselines describes the external ones.
Every command writes JSON (--output); all but compare also write PNG charts beside it with --plot.
`add_bench_parsers(subparsers)` registers `bench` and `roofline` on the CLI; this module imports
nothing heavy, the subcommands run in jaxinfer.bench.runs and jaxinfer.commands.roofline.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from jaxinfer.bench.baselines import BASELINES
from jaxinfer.bench.dataset import DatasetFile, LengthRange
from jaxinfer.bench.roofline import BYTES_PER_ELEMENT
from jaxinfer.engine.config import DTYPES, KV_DTYPES
from jaxinfer.bench.metrics import parse_slo
from jaxinfer.commands.arg_types import argument_type, at_least, existing_file, non_negative, positive, positive_list
from jaxinfer.commands.sampling_args import BENCH_SAMPLING_OPTIONS, add_sampling_args

RESULTS_DIR = Path("benchmarks/results")


# -- argument parsing ---------------------------------------------------------------------------

_length_range = argument_type(LengthRange.parse, "length")
_dataset = argument_type(DatasetFile.read, "dataset")
_slo = argument_type(parse_slo, "SLO")


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="engine directory, HF checkpoint directory or .gguf "
                                                 "(default: SmolLM2-135M-Instruct)")
    # A built engine carries its own: these shape the engine compiled in-process from a checkpoint.
    parser.add_argument("--dtype", choices=list(DTYPES), help="a checkpoint's engine dtype")
    parser.add_argument("--max-num-seqs", type=positive(int), help="a checkpoint's engine: sequences per step")
    parser.add_argument("--max-num-batched-tokens", type=positive(int), help="a checkpoint's engine: tokens per step")
    parser.add_argument("--max-model-len", type=positive(int), help="a checkpoint's engine: longest prompt plus output")
    parser.add_argument("--kv-memory", help="a checkpoint's engine: KV pool size, e.g. 1GiB")
    parser.add_argument("--decode-steps", type=positive(int),
                        help="a checkpoint's engine: model steps per decode-only call (1: one step a call)")
    add_prefix_caching_arg(parser)


def add_prefix_caching_arg(parser: argparse.ArgumentParser) -> None:
    """--no-prefix-caching, for any engine: the scheduler's choice, not the build's."""
    parser.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                        help="schedule without the prefix cache (any engine; on by default, as in vLLM)")


def add_workload_args(parser: argparse.ArgumentParser, num_requests: int) -> None:
    parser.add_argument("--num-requests", type=positive(int), default=num_requests, help="requests in the workload")
    parser.add_argument("--input-len", type=_length_range, default=LengthRange(16, 512),
                        help="prompt tokens: N or LO:HI (uniform)")
    parser.add_argument("--output-len", type=_length_range, default=LengthRange(16, 256),
                        help="generated tokens: N or LO:HI (uniform); with a --dataset of prompts, HI for those "
                             "without max_tokens (ShareGPT: the replies' lengths)")
    parser.add_argument("--seed", type=non_negative(int), default=0,
                        help="seed of the random requests, a dataset's draw (and serve's arrival times)")
    parser.add_argument("--dataset", type=_dataset,
                        help="instead of random requests: a JSONL file of prompts (taken in order), or a ShareGPT "
                             "JSON file of conversations (drawn by --seed; the replies' lengths as outputs)")
    parser.add_argument("--prefix-len", type=non_negative(int), default=0,
                        help="random prompts: a shared prefix of this many tokens before each prompt's own "
                             "--input-len tokens (what prefix caching serves)")
    parser.add_argument("--num-prefixes", type=positive(int), default=1,
                        help="random prompts: distinct shared prefixes, request i takes prefix i %% N")
    add_sampling_args(parser, None, "0, as the baselines", BENCH_SAMPLING_OPTIONS)
    parser.add_argument("--save-detailed", action="store_true",
                        help="also write every request's timings (TTFT, TPOT, ITLs, E2E, tokens, error) to the JSON")


def _add_output_args(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / f"{name}.json", help="JSON results file")
    parser.add_argument("--plot", action="store_true", help="also write PNG charts beside the JSON")


def _add_baseline_args(parser: argparse.ArgumentParser, workload: bool) -> None:
    """--baseline and, per external baseline, --NAME-python; with a workload of requests, also
    --baseline static, --NAME-num-requests and, for the baselines that batch, --NAME-batch-size."""
    choices = ["static", *BASELINES] if workload else list(BASELINES)
    parser.add_argument("--baseline", action="append", choices=choices, default=[],
                        help="also run this baseline on the same workload (repeatable)")
    # llama.cpp's threads spin at barriers: on a core shared with other jobs, 2 threads can run
    # several times slower than 1, so a busy machine may call for fewer threads than cores.
    parser.add_argument("--baseline-threads", type=positive(int),
                        help=f"threads of the {' and '.join(BASELINES)} baselines (default: all cores)")
    for b in BASELINES.values():
        parser.add_argument(f"--{b.name}-python", default=b.default_python,
                            help=f"python of a venv with {b.module}: {b.setup_hint}")
        if workload:
            parser.add_argument(f"--{b.name}-num-requests", type=positive(int),
                                help=f"run {b.label} on the first N requests only; default all")
            if b.batched:
                parser.add_argument(f"--{b.name}-batch-size", type=positive(int), default=8,
                                    help=f"requests per {b.label} generate call")


def _add_latency_figure_args(parser: argparse.ArgumentParser, prompt_lens: list[int]) -> None:
    """The figures `latency` and `compare` measure: TTFT per prompt length, decode tokens/s per batch."""
    parser.add_argument("--prompt-lens", type=positive_list(int), default=prompt_lens,
                        help="prompt lengths whose TTFT is measured, comma-separated")
    parser.add_argument("--batch-sizes", type=positive_list(int), default=[1, 8],
                        help="decode batch sizes whose tokens/s is measured, comma-separated")
    # a rate needs two tokens: it is timed from a request's first token to its last
    parser.add_argument("--decode-tokens", type=at_least(int, 2), default=64,
                        help="tokens generated per decode-rate request (at least 2)")
    parser.add_argument("--decode-context", type=positive(int), default=16,
                        help="prompt tokens of each decode-rate request: the context its decode steps read")


def add_bench_parsers(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="throughput, latency and serving benchmarks with baselines")
    modes = bench.add_subparsers(dest="bench_command", required=True)

    throughput = modes.add_parser("throughput", help="offline: all requests at once")
    _add_engine_args(throughput)
    add_workload_args(throughput, num_requests=256)
    _add_baseline_args(throughput, workload=True)
    throughput.add_argument("--static-batch", type=positive(int), help="static batch size (default: max_num_seqs)")
    _add_output_args(throughput, "throughput")
    throughput.set_defaults(run="jaxinfer.bench.runs:throughput_main")

    lat = modes.add_parser("latency", help="batch-1 TTFT, decode tokens/s and the roofline ratio")
    _add_engine_args(lat)
    _add_latency_figure_args(lat, prompt_lens=[16, 128, 512])
    lat.add_argument("--repeats", type=positive(int), default=3,
                     help="runs per figure (TTFT per prompt length, decode rate per batch size), their median shown")
    lat.add_argument("--bandwidth", type=positive(float), help="copy bandwidth in GB/s (measured when not given)")
    lat.add_argument("--flops", type=positive(float),
                     help="matmul rate in GFLOP/s for each decode batch's roofline (measured when not given)")
    lat.add_argument("--seed", type=non_negative(int), default=0, help="seed of the random prompts")
    _add_baseline_args(lat, workload=False)
    _add_output_args(lat, "latency")
    lat.set_defaults(run="jaxinfer.bench.runs:latency_main")

    ab = modes.add_parser("compare", help="an A/B of two engines in one process: TTFT and decode tokens/s in "
                                          "alternating rounds")
    for side in ("a", "b"):
        ab.add_argument(f"model_{side}", metavar=side.upper(),
                        help="engine directory, HF checkpoint directory or .gguf (a checkpoint is compiled with the "
                             "engine defaults: build variants with `jaxinfer build`)")
    _add_latency_figure_args(ab, prompt_lens=[128])
    ab.add_argument("--rounds", type=positive(int), default=6,
                    help="rounds, each measuring every figure once per engine (A first in even rounds)")
    ab.add_argument("--seed", type=non_negative(int), default=0, help="seed of the random prompts")
    ab.add_argument("--output", type=Path, default=RESULTS_DIR / "compare.json", help="JSON results file")
    ab.set_defaults(run="jaxinfer.bench.runs:compare_main")

    serve = modes.add_parser("serve", help="timed arrivals against --target HOST:PORT or an in-process engine")
    _add_engine_args(serve)
    serve.add_argument("--target", help="HOST:PORT of a `jaxinfer serve` gRPC server (else in-process MODEL)")
    serve.add_argument("--tls-ca", type=existing_file, help="with --target: PEM CA certificate of a TLS server")
    serve.add_argument("--auth-token-file", type=existing_file,
                       help="with --target: file holding the server's bearer token")
    add_workload_args(serve, num_requests=64)
    load = serve.add_mutually_exclusive_group()
    load.add_argument("--request-rate", type=positive_list(float), default=[math.inf],
                      help="requests/s, comma-separated for a sweep (inf: all at once)")
    load.add_argument("--concurrency", type=positive_list(int),
                      help="requests in flight, comma-separated: each ends, the next starts (closed loop)")
    serve.add_argument("--max-concurrency", type=positive(int),
                       help="with --request-rate: at most N requests in flight, as a pool of N clients; an "
                            "arrival waits for a free one, its clock starting when it is sent")
    serve.add_argument("--burstiness", type=positive(float), default=1.0, help="gamma shape: 1 is Poisson, <1 burstier")
    serve.add_argument("--slo", type=_slo, default={}, help="e.g. ttft=500ms,tpot=50ms (goodput)")
    serve.add_argument("--baseline", action="append", choices=["static"], default=[],
                       help="static batching on the same in-process engine")
    serve.add_argument("--static-batch", type=positive(int), help="static batch size (default: max_num_seqs)")
    _add_output_args(serve, "serve")
    serve.set_defaults(run="jaxinfer.bench.runs:serve_main")

    roofline = subparsers.add_parser("roofline", help="first-principles roofline of a model on this device")
    roofline.add_argument("--model", help="HF checkpoint directory or .gguf (default: SmolLM2-135M-Instruct)")
    roofline.add_argument("--engine", help="built engine directory (model, dtype and kv dtype from its manifest)")
    roofline.add_argument("--dtype", choices=list(BYTES_PER_ELEMENT),
                          help="weight dtype or quantization mode (default: what `jaxinfer build` makes here)")
    roofline.add_argument("--kv-dtype", choices=list(KV_DTYPES),
                          help="KV dtype (default: what `jaxinfer build` stores with --dtype)")
    roofline.add_argument("--batch", type=positive(int), default=1, help="sequences per step")
    roofline.add_argument("--context", type=positive(int), default=512,
                          help="context (decode) and prompt (prefill) length")
    roofline.add_argument("--bandwidth", type=positive(float), help="copy bandwidth in GB/s (measured when not given)")
    roofline.add_argument("--flops", type=positive(float), help="matmul rate in GFLOP/s (measured when not given)")
    _add_output_args(roofline, "roofline")
    roofline.set_defaults(run="jaxinfer.commands.roofline:main")
