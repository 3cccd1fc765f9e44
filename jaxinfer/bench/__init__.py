"""Benchmarks and research tools: workloads, timing metrics, the roofline calculator, baselines.

`jaxinfer bench throughput|latency|serve` and `jaxinfer roofline` (jaxinfer.commands) drive these
modules; each module here does one job and most are pure functions of plain data.
"""
