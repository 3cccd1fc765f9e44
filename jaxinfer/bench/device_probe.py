"""Measuring the device the roofline is drawn for: memory copy bandwidth and matmul rate.

Bandwidth is bytes read + written per second copying a large float32 array (a jitted jax scale;
on a CPU the better of that, which XLA may spread over several threads, and a numpy copy); the matmul rate
is FLOP/s of a jitted `[rows, k] @ [k, n]` with device-resident operands in the engine's dtype,
taken the way an engine's step takes it: on a CPU where the dense kernel runs, through it (AMX
tiles for bfloat16 where the CPU has them), else XLA's dot, float32 sums either way. Both report
the median of several timed repetitions after a warm-up. `last_level_cache_bytes` reads the size
of the CPU's largest cache: weights that fit in it can stream faster than the copy bandwidth.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.model.layers import linear
from jaxinfer.runner.step import route_dense_weight


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def copy_bandwidth(num_bytes: int | None = None, repeats: int = 7) -> float:
    """Bytes per second (read + written) of copying a `num_bytes` float32 array: 256 MiB on a CPU,
    4 GiB on an accelerator (so that one copy outlasts the host's timer and launch by far)."""
    on_cpu = jax.default_backend() == "cpu"
    num_bytes = num_bytes or (256 * 2**20 if on_cpu else 4 * 2**30)
    scale = jax.jit(lambda x: x * jnp.float32(1.0001))
    device_source = jax.random.normal(jax.random.key(0), (num_bytes // 4,), jnp.float32)
    seconds = median_seconds(lambda: scale(device_source).block_until_ready(), repeats)
    if on_cpu:
        source = np.asarray(device_source)
        target = np.empty_like(source)
        seconds = min(seconds, median_seconds(lambda: np.copyto(target, source), repeats))
    return 2 * num_bytes / seconds


def matmul_dtype(engine_dtype: str) -> str:
    """The dtype whose matmul rate bounds an engine of `engine_dtype` (a dtype or a quantization
    mode): quantized engines multiply float32 activations on a CPU, so the probe times the
    unquantized dense path for them."""
    return "bfloat16" if engine_dtype == "bfloat16" else "float32"


def matmul_rate(dtype: str = "float32", rows: int = 256, k: int = 2048, n: int = 2048, repeats: int = 7) -> float:
    """FLOP/s of a `dtype` (float32 or bfloat16) matmul of shape [rows, k] @ [k, n] through the
    engine's dense path (`linear` on the weight as a one-device step routes it)."""
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal((rows, k), dtype=np.float32).astype(dtype))
    w = jax.device_put(rng.standard_normal((k, n), dtype=np.float32).astype(dtype))
    weight = route_dense_weight(w, num_devices=1)
    matmul = jax.jit(linear)
    return 2 * rows * k * n / median_seconds(lambda: matmul(x, weight).block_until_ready(), repeats)


def last_level_cache_bytes(cache_dir: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """Size of the highest-level cache CPU 0 sees (sysfs `indexN/level` and `size`, as "307200K"),
    or None where the backend is not the CPU or sysfs does not say."""
    if jax.default_backend() != "cpu":
        return None
    caches = []
    for index in cache_dir.glob("index*"):
        try:
            level, size = int((index / "level").read_text()), (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:].upper(), 1)
        digits = size[:-1] if scale > 1 else size
        if digits.isdigit():
            caches.append((level, int(digits) * scale))
    return max(caches)[1] if caches else None


def cache_note(bytes_per_step: float, cache_bytes: int | None) -> str | None:
    """Where the bytes a decode step reads fit in the CPU's last-level cache (`cache_bytes`, None if
    unknown), a note that the cache can serve them faster than the memory a roofline assumes."""
    if cache_bytes is None or bytes_per_step > cache_bytes:
        return None
    return (f"the {bytes_per_step / 1e6:.0f} MB a decode step reads fit in this CPU's {cache_bytes / 2**20:.0f} MiB "
            "last-level cache, which can serve them faster than the memory bandwidth the roofline assumes")
