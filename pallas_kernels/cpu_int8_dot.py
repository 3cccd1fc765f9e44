"""An exact int8 x int8 -> int32 matmul for few rows on x86 CPUs: a C++ kernel called through XLA FFI,
reading int8 weights packed for it.

    pack(w_q [K, N] int8) -> [N/32, K/4, 32, 4]     the kernel's layout (`packable(K, N)`: K % 4 == 0,
                                                     N % 32 == 0); unpack() is its inverse
    int8_dot(x_q [M, K] int8, w_packed) -> [M, N] int32      x_q @ w_q, exactly
    w8a8_dot(x [M, K] float, w_packed, w_scale) -> [M, N] float32   W8A8 in one call: per-row int8
                            quantization of x, the exact dot, both scales (see the .cc)
    available() -> bool     whether it runs here (x86-64 with AVX-512 VNNI and VL, a C++ compiler,
                            the CPU backend); builds and registers it on first use
    serves(rows, w) -> bool whether `fastest_int8_dot` runs the kernel for these rows and weight
    fastest_int8_dot(x_q, w) -> [M, N] int32    the kernel for a packed weight and up to MAX_ROWS
                            rows, else XLA's int8 dot (on an [N, K] copy of a packed weight): what
                            the quantized matmuls' "xla" implementations call

Why: XLA:CPU's int8 dot streams a weight at a fraction of memory speed for one to a few rows,
and XLA has no fused dequantize-and-dot, so int8 decode steps ran no faster than float32 ones. The
kernel (`cpu_int8_dot.cc`, which explains its loop) streams a packed int8 weight sequentially: each
32-column tile is contiguous, its bytes in the order VNNI's dot-product instruction multiplies.
Engines built on such a CPU with one device store their int8 weights packed
(`jaxinfer.quant.apply.pack_for_cpu_kernel`), so the quantized modes whose matmul is an
int8 x int8 dot (W8A8, and W8A16 through the two-level activation split) take the bandwidth their
smaller weights promise. Measured on the project's 2-core CPU (30 layers of SmolLM2's four weight
shapes, 106 MB of int8, ad hoc interleaved timing, load average 1.1-1.4), milliseconds:

    rows                     1      2      4      8     16     32
    this kernel (packed)   5.5    5.4    5.3   10.9   18.9   25.9
    XLA's int8 dot        19.8   18.2   18.3   21.7   22.8   33.3

so up to MAX_ROWS it is 1.3-3.6x faster; at one row it streams 19 GB/s. That was one thread, on the
project's earlier EPYC VMs. On its Xeon VMs one thread streams about 12 GB/s from memory, so the
kernel now shares the tiles with XLA's intra-op thread pool and prefetches ahead in each tile:
120 fused w8a8 calls over the same 106 MB took 8.6 ms on one thread, 5.7-7.4 ms on two (ad hoc
chain, noisy), and a w8a8 SmolLM2 engine's batch-1 decode went from 62 to 98 tokens/s.
`w8a8_dot` also takes the activations' per-row quantization and both scales into the call: a
W8A8 matmul is one custom call instead of six XLA operations (59 -> 62 tokens/s on its own, before
the threads: those small operations were cheap).

Build: `pallas_kernels.cpu_ffi` compiles the source once per machine and registers it as the FFI
target `jaxinfer_int8_dot`.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.cpu_ffi import CpuKernel
from pallas_kernels.xla_cpu import min_rows_dot

TARGET = "jaxinfer_int8_dot"
W8A8_TARGET = "jaxinfer_w8a8_dot"
KERNEL = CpuKernel("CPU int8 kernel", (TARGET, W8A8_TARGET), Path(__file__).with_suffix(".cc"),
                   ("-mavx2", "-mavx512f", "-mavx512vl", "-mavx512vnni"),
                   frozenset({"avx2", "avx512f", "avx512vl", "avx512_vnni"}))
available = KERNEL.available
ensure_registered = KERNEL.ensure_registered
# Up to this many rows the kernel was measured faster than XLA's int8 dot (module docstring).
MAX_ROWS = 32
PACK_COLS = 32
PACK_DEPTH = 4


def packable(k: int, n: int) -> bool:
    """Whether a `[K, N]` weight can take the kernel's packed layout."""
    return k % PACK_DEPTH == 0 and n % PACK_COLS == 0


def pack(w_q: jax.Array) -> jax.Array:
    """`[K, N]` -> `[N/32, K/4, 32, 4]` with `packed[t, k4, c, i] = w_q[4 * k4 + i, 32 * t + c]`."""
    k, n = w_q.shape
    if not packable(k, n):
        raise ValueError(f"a [{k}, {n}] weight cannot be packed: K must be a multiple of {PACK_DEPTH} "
                         f"and N of {PACK_COLS}")
    return w_q.reshape(k // PACK_DEPTH, PACK_DEPTH, n // PACK_COLS, PACK_COLS).transpose(2, 0, 3, 1)


def unpack(w_packed: jax.Array) -> jax.Array:
    """Inverse of `pack`: `[N/32, K/4, 32, 4]` -> `[K, N]`."""
    tiles, depth, cols, group = w_packed.shape
    return w_packed.transpose(1, 3, 0, 2).reshape(depth * group, tiles * cols)


def standard_layout(w_q: jax.Array) -> jax.Array:
    """A weight in the `[K, N]` layout, whether it was packed or not."""
    return unpack(w_q) if w_q.ndim == 4 else w_q


def logical_shape(w_q: jax.Array) -> tuple[int, int]:
    """`(K, N)` of a weight, packed or not."""
    if w_q.ndim == 4:
        return w_q.shape[1] * w_q.shape[3], w_q.shape[0] * w_q.shape[2]
    return w_q.shape


def int8_dot(x_q: jax.Array, w_packed: jax.Array) -> jax.Array:
    """`x_q [M, K] int8 @ w [K, N] int8` -> `[M, N] int32` exactly, w given packed (`pack`)."""
    if (x_q.dtype != jnp.int8 or w_packed.dtype != jnp.int8 or x_q.ndim != 2 or w_packed.ndim != 4
            or w_packed.shape[2:] != (PACK_COLS, PACK_DEPTH) or x_q.shape[1] != logical_shape(w_packed)[0]):
        raise ValueError(f"int8_dot takes x [M, K] int8 and w packed [N/32, K/4, 32, 4] int8, got {x_q.shape} "
                         f"{x_q.dtype} and {w_packed.shape} {w_packed.dtype}")
    ensure_registered()
    out = jax.ShapeDtypeStruct((x_q.shape[0], logical_shape(w_packed)[1]), jnp.int32)
    return jax.ffi.ffi_call(TARGET, out)(x_q, w_packed)


def w8a8_dot(x: jax.Array, w_packed: jax.Array, w_scale: jax.Array) -> jax.Array:
    """W8A8 in one kernel call: `x [M, K]` float quantized per row to int8 exactly as
    `activation_quant.quantize_per_token` does, times the packed int8 weight, rescaled by the row
    scales and `w_scale` ([N], or [] broadcast) -> `[M, N]` float32."""
    k, n = logical_shape(w_packed)
    if x.ndim != 2 or x.shape[1] != k or w_packed.dtype != jnp.int8 or w_packed.ndim != 4:
        raise ValueError(f"w8a8_dot takes x [M, K] and w packed [N/32, K/4, 32, 4] int8, got {x.shape} and "
                         f"{w_packed.shape} {w_packed.dtype}")
    ensure_registered()
    scale = jnp.broadcast_to(w_scale.astype(jnp.float32), (n,))
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    return jax.ffi.ffi_call(W8A8_TARGET, out)(x.astype(jnp.float32), w_packed, scale)


def serves(rows: int, w_q: jax.Array) -> bool:
    """Whether `fastest_int8_dot` runs the kernel (rather than XLA's dot) for `rows` activation rows."""
    return w_q.ndim == 4 and rows <= MAX_ROWS and available()


def output_major(w_packed: jax.Array) -> jax.Array:
    """A packed weight as `[N, K]` (each output's K weights contiguous): `w[K, N].T`."""
    tiles, depth, cols, group = w_packed.shape
    return w_packed.transpose(0, 2, 1, 3).reshape(tiles * cols, depth * group)


def fastest_int8_dot(x_q: jax.Array, w_q: jax.Array) -> jax.Array:
    """`x_q [M, K] int8 @ w_q` (`[K, N]` or packed) -> `[M, N] int32` exactly, by the faster path."""
    if serves(x_q.shape[0], w_q):
        return int8_dot(x_q, w_q)
    if w_q.ndim == 4:
        # More rows than the kernel serves (prefill): XLA's dot over an [N, K] copy of the packed
        # weight, which is cheaper to make and to read than the [K, N] one (8 layers of SmolLM2's
        # weights, 33 / 64 / 256 rows: 4.4 / 5.4 / 13.4 ms against 6.5 / 7.3 / 14.2).
        return lax.dot_general(x_q, output_major(w_q), (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    return min_rows_dot(x_q, w_q, jnp.int32)
