"""The `jaxinfer bench` subcommands (parsed in jaxinfer.commands.bench): each builds the workload,
runs jaxinfer and the requested baselines on it, prints the side-by-side table and writes JSON
(and PNG charts with --plot). Arguments are the argparse Namespaces described there.
"""

from __future__ import annotations

import math
import sys

from jaxinfer.bench import compare, latency, plots
from jaxinfer.bench.arrivals import arrival_offsets
from jaxinfer.bench.dataset import (MIN_SHAREGPT_TOKENS, BenchRequest, LengthRange, dataset_requests, fresh_prefixes,
                                    random_requests, refuse_oversized, workload_summary)
from jaxinfer.bench.device_probe import cache_note, copy_bandwidth, last_level_cache_bytes, matmul_dtype, matmul_rate
from jaxinfer.bench.engine_runs import KVUsage, bench_params, drive
from jaxinfer.bench.baselines import BASELINES, checkpoint_source, run_job
from jaxinfer.bench.metrics import RequestTiming, run_metrics
from jaxinfer.bench.results import Column, advantages, comparison_table, cpu_times, write_results
from jaxinfer.bench.roofline import Device
from jaxinfer.commands.sampling_args import BENCH_SAMPLING_OPTIONS, given_sampling_options
from jaxinfer.engine.create import create_engine, given_flags, is_engine_dir, refuse_build_options
from jaxinfer.errors import RequestError

THROUGHPUT_COLUMNS = [
    Column(("requests_per_s",), "requests/s", True),
    Column(("input_tokens_per_s",), "input tokens/s", True, "{:.1f}"),
    Column(("output_tokens_per_s",), "output tokens/s", True, "{:.1f}"),
    Column(("duration_s",), "wall s", False, "{:.1f}", whole_workload=True),
]
SERVE_COLUMNS = [
    Column(("output_tokens_per_s",), "output tokens/s", True, "{:.1f}"),
    Column(("ttft_s", "median"), "TTFT p50 s", False, "{:.3f}"),
    Column(("ttft_s", "p99"), "TTFT p99 s", False, "{:.3f}"),
    Column(("tpot_s", "median"), "TPOT p50 s", False, "{:.4f}"),
    Column(("tpot_s", "p99"), "TPOT p99 s", False, "{:.4f}"),
    Column(("itl_s", "p99"), "ITL p99 s", False, "{:.4f}"),
    Column(("e2e_s", "median"), "E2E p50 s", False, "{:.2f}"),
]
# With --slo: the requests per second that met every SLO, and their share of all requests.
SLO_COLUMNS = [
    Column(("goodput_requests_per_s",), "goodput requests/s", True),
    Column(("slo_attainment",), "within SLO", True),
]
# With --prefix-len: the share of prompt tokens the prefix cache served.
PREFIX_CACHE_COLUMN = Column(("prefix_cache_hit_rate",), "prompt tokens cached", True)


# -- shared steps -------------------------------------------------------------------------------

# The options that shape an engine compiled from a checkpoint (jaxinfer.commands.bench's engine args).
ENGINE_OPTIONS = ("dtype", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "kv_memory", "decode_steps")


def _engine_options(args) -> dict:
    return {name: getattr(args, name) for name in ENGINE_OPTIONS}


def _engine(args, max_num_seqs: int | None = None):
    options = _engine_options(args)
    refuse_build_options(args.model, **options)
    return create_engine(args.model, progress=True, enable_prefix_caching=args.enable_prefix_caching,
                         **{**options, "max_num_seqs": max_num_seqs or args.max_num_seqs})


def _engine_config(engine) -> dict:
    """The engine's build config and the scheduler's prefix-cache choice, for the JSON results."""
    return {**vars(engine.engine_cfg), "enable_prefix_caching": engine.scheduler.block_manager.enable_prefix_caching}


def workload(args, vocab_size: int, encode, max_model_len: int, static: bool = False) -> list[BenchRequest]:
    """The requests of --dataset or the random workload, refused if one would not fit the engine
    (or, for static batching, if a padded static batch might not)."""
    if args.dataset is not None:
        sample = dataset_requests(args.dataset, encode, args.output_len.high, args.num_requests, args.seed,
                                  max_model_len)
        requests = sample.requests
        if sample.skipped or len(requests) < args.num_requests:
            print(f"dataset: {len(requests)} requests of the {args.num_requests} asked for"
                  + (f", {sample.skipped} conversations skipped (under two turns, under "
                     f"{MIN_SHAREGPT_TOKENS} tokens of prompt or reply, or over max_model_len)"
                     if sample.skipped else ""), file=sys.stderr)
    else:
        requests = random_requests(args.num_requests, args.input_len, args.output_len, vocab_size, args.seed,
                                   args.prefix_len, args.num_prefixes)
    refuse_oversized(requests, max_model_len)
    if static:
        _refuse_static_rectangles(requests, max_model_len)
    return requests


def _workload_description(args, requests: list[BenchRequest]) -> dict:
    """The workload's options and totals, for the JSON results."""
    options = {"dataset": str(args.dataset.path)} if args.dataset else {
        "input_len": str(args.input_len), "prefix_len": args.prefix_len, "num_prefixes": args.num_prefixes}
    return {**workload_summary(requests), **options, "output_len": str(args.output_len), "seed": args.seed,
            "sampling": sampling(args) or "greedy"}


def _refuse_static_rectangles(requests: list[BenchRequest], max_model_len: int) -> None:
    """Static batching pads a batch to its longest prompt and longest output, which may come from
    different requests: refuse a workload where that could exceed the engine before measuring."""
    prompt = max(len(r.prompt_token_ids) for r in requests)
    output = max(r.max_tokens for r in requests)
    if prompt + output > max_model_len:
        raise RequestError(f"static batching pads each batch to its longest prompt and output, up to {prompt} + "
                           f"{output} tokens in this workload, beyond the engine's max_model_len ({max_model_len}); "
                           "lower --input-len / --output-len (or the dataset's lengths), or drop --baseline static")


def warm_up(engine) -> None:
    """A few short requests through every step kind, so first-call costs stay out of the figures."""
    warm = random_requests(4, LengthRange(8, 40), LengthRange(4, 4), engine.model_cfg.vocab_size, seed=12345)
    drive(engine, warm, [0.0] * len(warm))


def sampling(args) -> dict:
    """The workload's sampling options given (--temperature, --top-p, --top-k; none: greedy)."""
    return given_sampling_options(args, BENCH_SAMPLING_OPTIONS)


def _refuse_workload_options(args) -> None:
    """Workload options that cannot go together, would be ignored, or that SamplingParams refuses,
    before any engine loads."""
    if args.dataset is not None and args.prefix_len:
        raise RequestError("--prefix-len shapes random prompts; a --dataset's prompts are taken as they are")
    if args.static_batch and "static" not in args.baseline:
        raise RequestError("--static-batch sizes the batches of --baseline static; add the baseline or drop it")
    bench_params(1, sampling(args))


def _static_batch(args, engine) -> tuple[int, str]:
    """--baseline static's batch size (default: max_num_seqs) and its row's name; a batch the
    engine could not step as one is refused."""
    batch = args.static_batch or engine.engine_cfg.max_num_seqs
    if batch > engine.engine_cfg.max_num_seqs:
        raise RequestError(f"--static-batch {batch} exceeds the engine's max_num_seqs "
                           f"({engine.engine_cfg.max_num_seqs}), so a batch would not run as one; lower it or "
                           "build an engine with a larger --max-num-seqs")
    return batch, f"static batching (B={batch})"


def _drive_point(engine, requests, index: int, offsets, args, static_batch: int | None = None,
                 max_in_flight: int | None = None) -> tuple[list[RequestTiming], float, dict]:
    """The requests (with fresh prefixes for run `index`) through the in-process engine at `offsets`,
    and how the run used the KV pool."""
    kv_usage = KVUsage(engine.scheduler.metrics())
    timings, duration = drive(engine, fresh_prefixes(requests, index, engine.model_cfg.vocab_size), offsets,
                              static_batch, max_in_flight, sampling(args), kv_usage)
    return timings, duration, {"kv_cache": kv_usage.summary()}


def _run_engine(engine, requests, run_index: int, args, static_batch: int | None = None
                ) -> tuple[dict, list[RequestTiming]]:
    """The workload, all submitted at once, through `engine`."""
    timings, duration, kv_usage = _drive_point(engine, requests, run_index, [0.0] * len(requests), args, static_batch)
    return {**run_metrics(timings, duration, detailed=args.save_detailed), **kv_usage}, timings


def _kv_cache_lines(systems: dict[str, dict]) -> list[str]:
    """How each in-process run used the KV pool (engine_runs.KVUsage)."""
    return [f"KV cache, {name}: peak {kv['peak_usage']:.0%} of {kv['num_blocks']} blocks of {kv['block_size']} "
            f"(mean {kv['mean_usage']:.0%}), {kv['unfilled_slot_fraction']:.1%} of the used blocks' slots "
            f"unfilled, {kv['peak_running_sequences']} sequences at most, {kv['preemptions']} preemptions"
            for name, kv in ((name, s["kv_cache"]) for name, s in systems.items() if "kv_cache" in s)]


def _external_baselines(args) -> list:
    """The external baselines asked for; their checkpoints are resolved here, so that a model they
    cannot load is refused before any measuring."""
    baselines = [BASELINES[name] for name in args.baseline if name in BASELINES]
    for baseline in baselines:
        checkpoint_source(args.model, baseline)
    return baselines


def _run_baseline(args, baseline, engine, job: dict) -> dict:
    """The job on the same weights, in the engine's dtype where the baseline has one, in the
    baseline's own Python (--NAME-python)."""
    threads = {"threads": args.baseline_threads} if args.baseline_threads else {}
    return run_job(baseline, getattr(args, f"{baseline.name}_python"),
                   {**job, **threads, "dtype": engine.engine_cfg.dtype,
                    "model": checkpoint_source(args.model, baseline)})


def _samples(timings: list[RequestTiming]) -> dict[str, list[float]]:
    """The completed requests' TTFTs and inter-token gaps, for the distributions chart."""
    completed = [t for t in timings if t.error is None]
    return {"ttft": [t.ttft for t in completed], "itl": [gap for t in completed for gap in t.itls]}


# -- throughput -----------------------------------------------------------------------------------

def throughput_main(args) -> None:
    started = cpu_times()
    _refuse_workload_options(args)
    baselines = _external_baselines(args)
    if sampling(args) and baselines:
        names = " and ".join(b.name for b in baselines)
        raise RequestError(f"the {names} baseline{'s generate' if len(baselines) > 1 else ' generates'} greedily: "
                           "drop --temperature / --top-p / --top-k, or the baseline")
    engine = _engine(args)
    requests = workload(args, engine.model_cfg.vocab_size, engine.tokenizer.encode, engine.engine_cfg.max_model_len,
                        static="static" in args.baseline)
    warm_up(engine)
    systems, samples = {}, {}
    systems["jaxinfer"], timings = _run_engine(engine, requests, 1, args)
    samples["jaxinfer"] = _samples(timings)
    if "static" in args.baseline:
        batch, name = _static_batch(args, engine)
        systems[name], timings = _run_engine(engine, requests, 2, args, static_batch=batch)
        samples[name] = _samples(timings)
    for baseline in baselines:
        subset = requests[:getattr(args, f"{baseline.name}_num_requests") or len(requests)]
        batch = getattr(args, f"{baseline.name}_batch_size") if baseline.batched else 1
        result = _run_baseline(args, baseline, engine, {
            "job": "throughput", "batch_size": batch,
            "requests": [[list(r.prompt_token_ids), r.max_tokens] for r in subset]})
        systems[f"{baseline.label} (B={batch}, {len(subset)} requests)"] = _rates(result)
    columns = THROUGHPUT_COLUMNS + ([PREFIX_CACHE_COLUMN] if args.prefix_len else [])
    print(comparison_table(systems, columns, reference="jaxinfer"))
    print("\n".join(_kv_cache_lines(systems)))
    write_results(args.output, {"workload": _workload_description(args, requests),
                                "engine_config": _engine_config(engine), "systems": systems,
                                "jaxinfer_advantage": advantages(systems, columns, "jaxinfer")}, started)
    if args.plot:
        plots.bar_chart({name.split(" (")[0]: s["output_tokens_per_s"] for name, s in systems.items()},
                        "output tokens/s", "Offline throughput", args.output.with_suffix(".png"))
        plots.distributions(samples, args.output.with_name(args.output.stem + "_distributions.png"))


def _rates(totals: dict) -> dict:
    duration = totals["duration_s"]
    return {**totals, "requests_per_s": totals["num_requests"] / duration,
            "input_tokens_per_s": totals["input_tokens"] / duration,
            "output_tokens_per_s": totals["output_tokens"] / duration}


# -- latency --------------------------------------------------------------------------------------

def _refuse_batch_sizes(batch_sizes: list[int], max_num_seqs: int) -> None:
    if max(batch_sizes) > max_num_seqs:
        raise RequestError(f"--batch-sizes {max(batch_sizes)} exceeds the engine's max_num_seqs ({max_num_seqs}), "
                           "so it would not decode as one batch; build an engine with a larger --max-num-seqs or "
                           "measure smaller batches")


def _refuse_lengths(args, max_model_len: int) -> None:
    """Each measured request must fit the engine: a prompt and its first token, a decode context and
    its decoded tokens."""
    longest = max(args.prompt_lens)
    if longest + 1 > max_model_len:
        raise RequestError(f"--prompt-lens {longest} leaves no room for a token in the engine's max_model_len "
                           f"({max_model_len}); measure shorter prompts or build with a larger --max-model-len")
    if args.decode_context + args.decode_tokens > max_model_len:
        raise RequestError(f"--decode-context {args.decode_context} + --decode-tokens {args.decode_tokens} exceed "
                           f"the engine's max_model_len ({max_model_len}); lower them or build with a larger "
                           "--max-model-len")


def latency_main(args) -> None:
    started = cpu_times()
    baselines = _external_baselines(args)
    # A checkpoint's engine is refused before it compiles, a built engine once its manifest is read
    # (where an explicit --max-num-seqs is refused as a build option).
    if args.max_num_seqs is not None and not is_engine_dir(args.model):
        _refuse_batch_sizes(args.batch_sizes, args.max_num_seqs)
    engine = _engine(args, max_num_seqs=args.max_num_seqs or max(args.batch_sizes))
    _refuse_batch_sizes(args.batch_sizes, engine.engine_cfg.max_num_seqs)
    _refuse_lengths(args, engine.engine_cfg.max_model_len)
    warm_up(engine)
    bandwidth = args.bandwidth * 1e9 if args.bandwidth else copy_bandwidth()
    probe_dtype = matmul_dtype(engine.engine_cfg.quant or engine.engine_cfg.dtype)
    device = Device(bandwidth, args.flops * 1e9 if args.flops else matmul_rate(probe_dtype))
    ours = {"ttft_s": {str(n): latency.ttft(engine, n, args.repeats, args.seed + n) for n in args.prompt_lens},
            "decode_tokens_per_s": {str(b): latency.decode_rate(engine, b, args.decode_context, args.decode_tokens,
                                                                      args.repeats, args.seed + b)
                                    for b in args.batch_sizes}}
    # the context a batch-1 decode step reads: the prompt and, on average, half the decoded tokens
    context = args.decode_context + args.decode_tokens // 2
    read_per_token = latency.token_bytes(engine, context)
    stream_rate = bandwidth / read_per_token
    systems = {"jaxinfer": ours}
    vocab = engine.model_cfg.vocab_size
    for baseline in baselines:
        systems[baseline.label] = _run_baseline(args, baseline, engine, {
            "job": "latency", "decode_tokens": args.decode_tokens, "decode_repeats": args.repeats,
            # one at a time, a baseline that does not batch has only a batch-1 decode rate
            "batch_sizes": [b for b in args.batch_sizes if baseline.batched or b == 1],
            "ttft_prompts": {str(n): [list(r.prompt_token_ids) for r in random_requests(
                args.repeats, LengthRange(n, n), LengthRange(1, 1), vocab, args.seed + n)] for n in args.prompt_lens},
            "decode_prompts": [list(r.prompt_token_ids) for r in random_requests(
                max(args.batch_sizes), LengthRange(args.decode_context, args.decode_context), LengthRange(1, 1), vocab,
                args.seed)]})
    columns = ([Column(("ttft_s", str(n)), f"TTFT@{n} s", False, "{:.4f}") for n in args.prompt_lens]
               + [Column(("decode_tokens_per_s", str(b)), f"decode tok/s @B={b}", True, "{:.1f}")
                  for b in args.batch_sizes])
    print(comparison_table(systems, columns, reference="jaxinfer"))
    batch1 = ours["decode_tokens_per_s"].get("1")
    cache = last_level_cache_bytes()
    roofline_fields = {"copy_bandwidth_gb_per_s": bandwidth / 1e9, "roofline_tokens_per_s": stream_rate,
                       "mean_context": context, "token_bytes": read_per_token, "last_level_cache_bytes": cache}
    if batch1 is not None:
        roofline_fields["batch1_roofline_ratio"] = batch1 / stream_rate
        print(f"batch-1 decode {batch1:.1f} tokens/s = {batch1 / stream_rate:.2f} of the memory-bandwidth roofline "
              f"({stream_rate:.1f} tokens/s at {bandwidth / 1e9:.1f} GB/s copy bandwidth: the weights and "
              f"{context} positions' K/V a token)")
        if note := cache_note(read_per_token, cache):
            print(f"  {note}, so the ratio can exceed 1")
    roofline_fields["matmul_flops_per_s"] = device.flops_per_s
    roofline_fields["decode"] = decode_against_roofline(engine, device, context, ours["decode_tokens_per_s"])
    print(f"decode against its roofline ({bandwidth / 1e9:.1f} GB/s, {device.flops_per_s / 1e9:.1f} GFLOP/s "
          f"{'given' if args.flops else probe_dtype}): " + ", ".join(
              f"batch {b} {r['ratio']:.2f} of {r['predicted_tokens_per_s']:.0f} tokens/s ({r['bound']}-bound)"
              for b, r in roofline_fields["decode"].items()))
    write_results(args.output, {"engine_config": _engine_config(engine), "roofline": roofline_fields,
                                "systems": systems, "jaxinfer_advantage": advantages(systems, columns, "jaxinfer")},
                  started)
    if args.plot:
        first = args.batch_sizes[0]
        plots.bar_chart(decode_bars(systems, first, stream_rate), "tokens/s", f"Decode at batch {first}",
                        args.output.with_suffix(".png"))


def decode_against_roofline(engine, device: Device, context: int, rates: dict[str, float]) -> dict[str, dict]:
    """Each measured decode batch's tokens/s against its roofline step (latency.decode_roofline) at
    the mean context its steps read: the predicted tokens/s, which bound it, and the ratio."""
    rooflines = {}
    for batch, rate in rates.items():
        step = latency.decode_roofline(engine, device, int(batch), context)
        predicted = int(batch) / step.time_s
        rooflines[batch] = {"predicted_tokens_per_s": predicted, "bound": step.bound, "ratio": rate / predicted}
    return rooflines


def decode_bars(systems: dict[str, dict], batch_size: int, roofline_tokens_per_s: float) -> dict[str, float]:
    """The latency chart's bars: each system's decode rate at `batch_size` (a baseline that does not
    batch has a rate at batch 1 only, and no bar at other sizes), and at batch 1 the roofline's."""
    bars = {name: s["decode_tokens_per_s"][str(batch_size)] for name, s in systems.items()
            if str(batch_size) in s["decode_tokens_per_s"]}
    if batch_size == 1:
        bars["bandwidth roofline"] = roofline_tokens_per_s
    return bars


# -- compare --------------------------------------------------------------------------------------

def compare_main(args) -> None:
    started = cpu_times()
    engines = {"a": create_engine(args.model_a, progress=True), "b": create_engine(args.model_b, progress=True)}
    for engine in engines.values():
        _refuse_batch_sizes(args.batch_sizes, engine.engine_cfg.max_num_seqs)
        _refuse_lengths(args, engine.engine_cfg.max_model_len)
        warm_up(engine)
    vocab = min(engine.model_cfg.vocab_size for engine in engines.values())  # prompts both can take

    def measure(side: str, figure: compare.Figure, seed: int) -> float:
        if figure.kind == "ttft":
            return latency.ttft(engines[side], figure.size, 1, seed, vocab)
        return latency.decode_rate(engines[side], figure.size, args.decode_context, args.decode_tokens, 1, seed, vocab)

    figures = ([compare.Figure("ttft", n) for n in args.prompt_lens]
               + [compare.Figure("decode", b) for b in args.batch_sizes])
    values = compare.run_rounds(measure, figures, args.rounds, args.seed)
    summaries = {f.name: compare.summarize(*values[f], f.higher_is_better) for f in figures}
    sides = {side: {"model": str(model), "engine_config": _engine_config(engines[side])}
             for side, model in (("a", args.model_a), ("b", args.model_b))}
    for side, described in sides.items():
        config = described["engine_config"]
        print(f"{side.upper()}: {described['model']} ({config['quant'] or config['dtype']})")
    print("\n".join(compare.comparison_lines(summaries, args.rounds)))
    write_results(args.output, {**sides, "rounds": args.rounds, "decode_context": args.decode_context,
                                "decode_tokens": args.decode_tokens, "figures": summaries}, started)


# -- serve ----------------------------------------------------------------------------------------

def serve_main(args) -> None:
    started = cpu_times()
    _refuse_workload_options(args)
    if args.concurrency and args.max_concurrency:
        raise RequestError("--concurrency N already holds N requests in flight; --max-concurrency goes with "
                           "--request-rate")
    if args.target and args.baseline:
        raise RequestError("--baseline static runs an in-process engine; drop --target to compare against it")
    if not args.target and (args.tls_ca or args.auth_token_file):
        raise RequestError("--tls-ca and --auth-token-file are for a server's connection: give --target HOST:PORT")
    ignored = (["MODEL"] if args.model else []) + given_flags(**_engine_options(args)) \
        + ([] if args.enable_prefix_caching else ["--no-prefix-caching"])
    if args.target and ignored:
        raise RequestError(f"with --target the server's engine is measured: {' and '.join(ignored)} would be "
                           "ignored; give them to `jaxinfer serve`")
    if args.concurrency and args.burstiness != 1.0:
        raise RequestError("--burstiness shapes the arrivals of --request-rate; a --concurrency loop has none")
    points = [("concurrency", c) for c in args.concurrency] if args.concurrency else \
        [("request_rate", r) for r in args.request_rate]
    curves: dict[str, list[dict]] = {}
    samples = {}
    if args.target:
        from jaxinfer.bench.grpc_load import model_info, run_load, server_tokenizer
        from serving.client_connection import ServerConnection

        connection = ServerConnection(args.target, args.tls_ca, args.auth_token_file, address_flag="--target")
        info = model_info(connection)
        with server_tokenizer(connection) as encode:
            requests = workload(args, info.vocab_size, encode, info.max_model_len)
        runs = {"jaxinfer serve": lambda index, offsets, limit: (*run_load(
            connection, fresh_prefixes(requests, index, info.vocab_size), offsets, limit, sampling(args)), {})}
    else:
        engine = _engine(args)
        requests = workload(args, engine.model_cfg.vocab_size, engine.tokenizer.encode,
                            engine.engine_cfg.max_model_len, static="static" in args.baseline)
        warm_up(engine)
        runs = {"jaxinfer": lambda index, offsets, limit: _drive_point(engine, requests, index, offsets, args,
                                                                       max_in_flight=limit)}
        if "static" in args.baseline:
            static_batch, name = _static_batch(args, engine)
            runs[name] = lambda index, offsets, limit: _drive_point(engine, requests, index, offsets, args,
                                                                    static_batch, limit)
    columns = SERVE_COLUMNS + (SLO_COLUMNS if args.slo else []) + ([PREFIX_CACHE_COLUMN] if args.prefix_len else [])
    index = 0
    for kind, value in points:
        rate, limit = (value, args.max_concurrency) if kind == "request_rate" else (math.inf, value)
        offsets = arrival_offsets(len(requests), rate, args.burstiness, args.seed)
        point = {}
        for name, run in runs.items():
            index += 1
            timings, duration, extra = run(index, offsets, limit)
            point[name] = {kind: value, **run_metrics(timings, duration, args.slo, args.save_detailed), **extra}
            _report_failures(name, point[name])
            curves.setdefault(name, []).append(point[name])
            samples[name] = _samples(timings)  # the distributions chart shows the last point
        print(f"\n{kind} = {value}")
        print(comparison_table(point, columns, reference=next(iter(runs))))
        if kv_lines := _kv_cache_lines(point):  # in-process runs
            print("\n".join(kv_lines))
    _print_tpot_growth(curves)
    write_results(args.output, {"workload": _workload_description(args, requests),
                                "engine_config": None if args.target else _engine_config(engine),
                                "burstiness": args.burstiness,
                                "max_concurrency": args.max_concurrency, "slo": args.slo, "curves": curves},
                  started)
    if args.plot:
        plots.latency_throughput_curve(curves, args.output.with_suffix(".png"))
        plots.distributions(samples, args.output.with_name(args.output.stem + "_distributions.png"))


def _report_failures(name: str, metrics: dict) -> None:
    """Says which requests the server refused or broke off; a run where none completed stops the sweep."""
    failed = metrics["failed_requests"]
    if not failed:
        return
    errors = "; ".join(f"{count} x {error}" for error, count in metrics["errors"].items())
    if not metrics["num_requests"]:
        raise RequestError(f"{name}: every request failed ({errors})")
    print(f"{name}: {failed} of {failed + metrics['num_requests']} requests failed and are left out of the "
          f"figures ({errors})", file=sys.stderr)


def _print_tpot_growth(curves: dict[str, list[dict]]) -> None:
    """Median TPOT at each point relative to the first (lightest) point of the sweep."""
    for name, runs in curves.items():
        base = runs[0]["tpot_s"].get("median")
        if base:
            growth = ", ".join(f"{run['tpot_s'].get('median', float('nan')) / base:.2f}x" for run in runs)
            print(f"{name}: p50 TPOT relative to the first point: {growth}")
