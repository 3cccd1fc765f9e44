"""`jaxinfer roofline`: the first-principles calculator for a model on this device.

Prints weight bytes, KV bytes per token, FLOPs per token (prefill and decode), arithmetic
intensity, and the predicted compute- and bandwidth-bound times of a decode step and of a
prefill at --batch/--context, against the copy bandwidth and matmul rate measured here (or
given with --bandwidth GB/s and --flops GFLOP/s), and the decode step's rate at batch sizes 1-256.
Writes the figures as JSON (--output) and, with --plot, the roofline chart beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxinfer.bench import device_probe
from jaxinfer.bench.results import cpu_times, write_results
from jaxinfer.bench.roofline import Device, roofline_report
from jaxinfer.checkpoint import load_config
from jaxinfer.configs import default_dtype, default_kv_dtype
from jaxinfer.engine.create import given_flags
from jaxinfer.errors import EngineError, RequestError
from jaxinfer.model.config import ModelConfig, RopeScaling
from jaxinfer.quant.apply import QUANT_MODES


def _model_and_dtypes(args) -> tuple[ModelConfig, str, str]:
    if args.engine:
        given = given_flags(model=args.model, dtype=args.dtype, kv_dtype=args.kv_dtype)
        if given:
            raise RequestError(f"{' and '.join(given)} come from the engine's manifest with --engine; drop "
                               f"{'it' if len(given) == 1 else 'them'}, or drop --engine")
        manifest_path = Path(args.engine) / "manifest.json"
        if not manifest_path.is_file():
            raise EngineError(f"{args.engine} has no manifest.json; pass an engine directory made by `jaxinfer build`")
        manifest = json.loads(manifest_path.read_text())
        fields = dict(manifest["model_config"])
        if fields.get("rope_scaling"):
            fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
        fields["eos_token_ids"] = tuple(fields.get("eos_token_ids", ()))
        engine = manifest["engine_config"]
        return ModelConfig(**fields), engine.get("quant") or engine["dtype"], engine["kv_dtype"]
    dtype = args.dtype or default_dtype()
    return load_config(args.model), dtype, args.kv_dtype or default_kv_dtype(dtype, quantized=dtype in QUANT_MODES)


def main(args) -> None:
    started = cpu_times()
    cfg, dtype, kv_dtype = _model_and_dtypes(args)
    bandwidth = args.bandwidth * 1e9 if args.bandwidth else device_probe.copy_bandwidth()
    matmul_dtype = device_probe.matmul_dtype(dtype)
    flops = args.flops * 1e9 if args.flops else device_probe.matmul_rate(matmul_dtype)
    report = roofline_report(cfg, Device(bandwidth, flops), args.batch, args.context, dtype, kv_dtype)
    report["device"]["measured"] = {"bandwidth": args.bandwidth is None, "flops": args.flops is None}
    report["device"]["matmul_dtype"] = "given" if args.flops else matmul_dtype
    report["device"]["last_level_cache_bytes"] = device_probe.last_level_cache_bytes()
    print(format_report(report))
    write_results(args.output, report, started)
    if args.plot:
        from jaxinfer.bench import plots

        plots.roofline_chart(report, args.output.with_suffix(".png"))


def format_report(report: dict) -> str:
    device, decode, prefill = report["device"], report["decode_step"], report["prefill_step"]
    return "\n".join([
        f"model {report['model']['name'] or '?'}: {report['model']['num_params'] / 1e6:.1f}M parameters, "
        f"weights {report['dtype']}, KV {report['kv_dtype']}",
        f"device: copy bandwidth {device['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, "
        f"matmul {device['flops_per_s'] / 1e9:.1f} GFLOP/s ({device['matmul_dtype']})",
        f"weight bytes             {report['weight_bytes'] / 1e6:10.1f} MB",
        f"KV bytes per token       {report['kv_bytes_per_token']:10.0f} B",
        f"decode FLOPs per token   {report['decode_flops_per_token'] / 1e6:10.1f} MFLOP (context {report['context_len']})",
        f"prefill FLOPs per token  {report['prefill_flops_per_token'] / 1e6:10.1f} MFLOP (prompt {report['context_len']})",
        *(f"{label} step, batch {report['batch']}: {step['flops'] / 1e9:.2f} GFLOP, {step['bytes'] / 1e6:.1f} MB, "
          f"intensity {step['intensity_flops_per_byte']:.1f} FLOP/B; compute {1e3 * step['compute_time_s']:.2f} ms, "
          f"bandwidth {1e3 * step['memory_time_s']:.2f} ms -> {step['bound']}-bound, {rate:.1f} tokens/s"
          for label, step, rate in (("decode ", decode, report["decode_tokens_per_s"]),
                                    ("prefill", prefill, report["prefill_tokens_per_s"]))),
        f"batch-1 decode bandwidth bound: {report['batch1_decode_bandwidth_bound_tokens_per_s']:.1f} tokens/s",
        "decode tokens/s predicted at batch " + " / ".join(str(s["batch"]) for s in report["decode_sweep"]) + ": "
        + " / ".join(f"{s['tokens_per_s']:.0f}" for s in report["decode_sweep"]),
        *_cache_note(report),
    ])


def _cache_note(report: dict) -> list[str]:
    note = device_probe.cache_note(report["decode_step"]["bytes"], report["device"].get("last_level_cache_bytes"))
    return [f"  {note}"] if note else []
