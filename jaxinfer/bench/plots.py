"""PNG charts of benchmark results (matplotlib, headless): latency-throughput curves, TTFT/ITL
distributions, bars, and the roofline. Inputs are the plain dicts/lists the bench commands produce."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)


def latency_throughput_curve(curves: dict[str, list[dict]], path: Path) -> Path:
    """`curves[system]` is a list of run metrics (one per rate or concurrency) as from
    `metrics.run_metrics`; plots median and p99 TPOT and TTFT against output tokens/s."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for system, runs in curves.items():
        throughput = [run["output_tokens_per_s"] for run in runs]
        for axis, metric in zip(axes, ("tpot_s", "ttft_s")):
            line, = axis.plot(throughput, [1000 * run[metric].get("median", float("nan")) for run in runs],
                              "o-", label=f"{system} median")
            axis.plot(throughput, [1000 * run[metric].get("p99", float("nan")) for run in runs], "x--",
                      color=line.get_color(), label=f"{system} p99")
    for axis, title in zip(axes, ("TPOT", "TTFT")):
        axis.set(xlabel="output tokens/s", ylabel=f"{title} (ms)", title=f"{title} vs throughput")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    return _save(figure, path)


def distributions(samples: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """`samples[system]["ttft" | "itl"]` are seconds; one histogram panel per metric."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, metric in zip(axes, ("ttft", "itl")):
        for system, by_metric in samples.items():
            values = [1000 * v for v in by_metric.get(metric, [])]
            if values:
                axis.hist(values, bins=40, alpha=0.5, label=system)
        axis.set(xlabel=f"{metric.upper()} (ms)", ylabel="count", title=f"{metric.upper()} distribution")
        axis.legend(fontsize=7)
    return _save(figure, path)


def bar_chart(values: dict[str, float], ylabel: str, title: str, path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.bar(list(values), list(values.values()), color="tab:blue")
    for x, v in enumerate(values.values()):
        axis.text(x, v, f"{v:.1f}", ha="center", va="bottom")
    axis.set(ylabel=ylabel, title=title)
    return _save(figure, path)


def roofline_chart(report: dict, path: Path) -> Path:
    """`jaxinfer roofline`'s report on its roofline: attainable GFLOP/s against arithmetic intensity
    (the device's bandwidth slope up to its matmul rate), with the decode steps of `decode_sweep`
    and the prefill step placed where their intensity puts them."""
    device = report["device"]
    bandwidth, peak = device["bandwidth_bytes_per_s"], device["flops_per_s"]
    ridge = peak / bandwidth
    decodes, prefill = report["decode_sweep"], report["prefill_step"]

    def attainable(step: dict) -> float:
        return step["flops"] / step["predicted_time_s"] / 1e9

    intensities = [s["intensity_flops_per_byte"] for s in decodes] + [prefill["intensity_flops_per_byte"], ridge]
    x = np.geomspace(min(intensities) / 3, max(intensities) * 3, 200)
    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    axis.loglog(x, np.minimum(peak, bandwidth * x) / 1e9, "k-",
                label=f"roof: {bandwidth / 1e9:.1f} GB/s, {peak / 1e9:.0f} GFLOP/s")
    axis.axvline(ridge, color="gray", linestyle=":", label=f"ridge at {ridge:.1f} FLOP/byte")
    axis.loglog([s["intensity_flops_per_byte"] for s in decodes], [attainable(s) for s in decodes], "o",
                color="tab:blue", label=f"decode steps at context {report['context_len']}")
    labelled = 0.0  # past the ridge the batches' intensities bunch up: label those 1.5x apart
    for step in decodes:
        if step["intensity_flops_per_byte"] >= 1.5 * labelled:
            labelled = step["intensity_flops_per_byte"]
            axis.annotate(f"B={step['batch']}", (labelled, attainable(step)), textcoords="offset points",
                          xytext=(4, -10), fontsize=7)
    axis.loglog([prefill["intensity_flops_per_byte"]], [attainable(prefill)], "s", color="tab:orange",
                label=f"prefill, {report['batch']} x {report['context_len']} tokens")
    axis.set(xlabel="arithmetic intensity (FLOP/byte)", ylabel="attainable GFLOP/s",
             title=f"{report['model']['name'] or 'model'}: weights {report['dtype']}, KV {report['kv_dtype']}")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=7)
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"chart written to {path}", file=sys.stderr)
    return path
