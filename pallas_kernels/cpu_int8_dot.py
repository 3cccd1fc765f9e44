"""An exact int8 x int8 -> int32 matmul for few rows on x86 CPUs: a C++ kernel called through XLA FFI,
reading int8 weights packed for it.

    pack(w_q [K, N] int8) -> PackedInt8      the kernel's layout (`packable(K, N)`: N % 4 == 0):
                                              codes [N/4, 4, K], the weight output-major in blocks
                                              of 4 outputs, and sums [N] int32, each output's
                                              weights summed (the VNNI loop's offset, see the .cc);
                                              unpack() is its inverse, output_major() its free
                                              [N, K] view
    int8_dot(x_q [M, K] int8, w_packed) -> [M, N] int32      x_q @ w_q, exactly
    w8a8_dot(x [M, K] float, w_packed, w_scale, live_rows=None) -> [M, N] float32   W8A8 in one
                            call: per-row int8 quantization of x, the exact dot, both scales (see
                            the .cc); only the first live_rows rows (a traced int32 scalar, default
                            M), zeros after them (`cpu_ffi.live_row_operand`)
    w8a8_add_norm(x, w_packed, w_scale, residual [M, N] f32, norm_weight [N], eps, live_rows=None),
    w8a8_qkv_rope(x, w_packed, w_scale, cos, sin [M, D / 2] f32, kv_heads, q_per_kv, live_rows=None),
    w8a8_swiglu(x, w_packed, w_scale, live_rows=None)
                            w8a8_dot and then the residual add and RMSNorm, the split into heads and
                            RoPE, or the SwiGLU in the same call, float32 results, as
                            pallas_kernels.cpu_row_passes describes them
    available() -> bool     whether it runs here (x86-64 with AVX2, a C++ compiler, the CPU
                            backend; the AVX-512 VNNI loop where the CPU has it, and AMX where
                            the CPU and OS allow it); builds and registers it on first use
    serves(rows, w) -> bool whether `fastest_int8_dot` runs the kernel for these rows and weight
    fastest_int8_dot(x_q, w) -> [M, N] int32    the kernel for a packed weight and up to max_rows()
                            rows, else XLA's int8 dot (on the [N, K] view of a packed weight): what
                            the quantized matmuls' "xla" implementations call

Why: XLA:CPU's int8 dot streams a weight at a fraction of memory speed for one row, and XLA has no
fused dequantize-and-dot, so int8 decode steps ran no faster than float32 ones. The kernel
(`cpu_int8_dot.cc`, which explains its loop) streams a packed int8 weight sequentially, shares the
output blocks with XLA's intra-op thread pool, and prefetches ahead. Engines built on such a CPU
with one device store their int8 weights packed (`jaxinfer.quant.apply.pack_for_cpu_kernel`), so the
quantized modes whose matmul is an int8 x int8 dot (W8A8, and W8A16 through the two-level
activation split) take the bandwidth their smaller weights promise.

The layout is output-major because XLA's dot reads that one well: prefill steps, with more rows than
the kernel serves, hand XLA the packed bytes as `[N, K]` with no copy. An earlier layout, in VNNI's
order ([N/32, K/4, 32, 4]), made every prefill step copy each weight first. From 5 rows, on CPUs
with AMX (Sapphire Rapids and later) the kernel multiplies with AMX tiles, which read the same
layout in place (see the .cc). Measured on the project's Xeon VM (8 layers of SmolLM2's four weight
shapes, 28 MB of int8, medians of 9-21 calls, noisy: repeats differ by up to 20%), milliseconds:

    rows                                  1      2      4      8     16     32     64    128    256
    this kernel (VNNI to 4 rows, AMX)  0.81   0.95   1.13   1.49   1.49   1.55   2.06   4.12   9.87
    the same, VNNI only                0.86   0.87   0.97   1.55   2.57
    XLA's dot on the [N, K] view       36.2    1.9    2.0    1.8    2.0    2.1    3.1    5.2    7.3
    previous kernel (VNNI order)       1.10   0.87   0.88   1.38   2.20   4.02   8.05          32.7
    XLA's dot on a copy of the above   30.8    5.3    5.1    5.2    5.2    6.2    6.3          10.3

so max_rows() is 32 with AMX (inside 64- and 128-token prefill steps the kernel was no faster than
XLA, and 32 covers the default engine's decode batches). The VNNI loop then kept its sums on the
stack; with them in registers (the .cc) it is 32 with VNNI alone too. On the Zen 4 VM (AVX-512
VNNI, no AMX; 2026-12-07, w8a8 engines built with each limit, `jaxinfer bench compare A B`, six
alternating rounds), since the kernel computes a step's real rows where XLA's dot computes the
whole bucket: 16 rows against 8 took decode at batch 10 / 12 / 16 to 1.28 / 1.22 / 1.08x and TTFT
at 12 tokens to 1.53x; 24 against 16 batch 18 / 20 / 24 1.19 / 1.18 / 1.02x, TTFT at 20 tokens
1.16x; 32 against 24 batch 24 / 28 / 32 0.99 / 1.05 / 1.02x, TTFT at 28 tokens 1.10x.

On the Xeon VM at one row the kernel reads 33 GB/s (28 MB may sit in its large L3 cache). In a
w8a8 SmolLM2 engine there, AMX and 32 rows took batch-8 decode from 242-255 to 272-274 tokens/s
and batch 16 from 308-328 to 337-349.
`w8a8_dot` also takes the activations' per-row quantization and both scales into the call: a
W8A8 matmul is one custom call instead of six XLA operations. Its quantization (cpu_quantize.h,
shared with cpu_int4_dot) is vectorized: written with scalar `nearbyint` it added 3.4 ms to 120
calls of 32 rows (30 layers), now 0.2-0.7.

CPUs without AVX-512 VNNI take the AVX2 build (int16 widening, `vpmaddwd`, 2 rows per pass). On
an AMD EPYC Zen 2 VM (AVX2 only), the 576 x 49152 head at 1 / 2 / 4 / 8 / 16 rows: kernel 2.5 /
2.5 / 3.2 / 4.9 / 12.7 ms, XLA's int8 dot on the [N, K] view 40.9 / 4.7 / 5.1 / 6.6 / 11.1; a
1536 x 576 weight 0.066 / 0.098 / 0.106 / 0.200 / 0.293 against 0.440 / 0.276 / 0.297 / 0.193 /
0.656 (whole jitted calls), so max_rows() stays 8 there.

The fused W8A8 calls take the operations between a float32 engine's kernels (each norm's sum of
squares, rsqrt and multiplies, the residual adds, RoPE's slices, rotations and concatenation, the
SwiGLU) into the call whose product they follow, as cpu_int4_dot's do: on the Zen 4 VM a w8a8
engine's batch-1 decode 1.04x and TTFT at 16 tokens 1.11x (`jaxinfer bench compare`, ten
alternating rounds, 2026-12-07; pallas_kernels/README.md).

Build: `pallas_kernels.cpu_ffi` compiles the source once per machine and registers it as the FFI
targets `jaxinfer_int8_dot`, `jaxinfer_w8a8_dot`, `jaxinfer_w8a8_add_norm`, `jaxinfer_w8a8_qkv_rope`
and `jaxinfer_w8a8_swiglu`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import cpu_ffi, cpu_row_passes
from pallas_kernels.xla_cpu import min_rows_dot

TARGET = "jaxinfer_int8_dot"
W8A8_TARGET = "jaxinfer_w8a8_dot"
ADD_NORM_TARGET = "jaxinfer_w8a8_add_norm"
QKV_ROPE_TARGET = "jaxinfer_w8a8_qkv_rope"
SWIGLU_TARGET = "jaxinfer_w8a8_swiglu"
KERNEL = cpu_ffi.CpuKernel(
    "CPU int8 kernel", (TARGET, W8A8_TARGET, ADD_NORM_TARGET, QKV_ROPE_TARGET, SWIGLU_TARGET),
    Path(__file__).with_suffix(".cc"),
    (cpu_ffi.Isa(("-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mamx-tile",
                  "-mamx-int8"), frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"})),
     cpu_ffi.AVX2))
available = KERNEL.available
ensure_registered = KERNEL.ensure_registered
PACK_COLS = 4


def max_rows() -> int:
    """Up to this many rows the kernel was measured faster than XLA's int8 dot (module docstring):
    with AMX, which it uses from 5 rows where the CPU has it, and with VNNI alone. With AMX it was
    faster up to 128 rows alone, but not inside prefill steps of 64 and 128 tokens; 32 covers every
    decode batch of the default engine (max_num_seqs). The AVX2 build stays at 8. A function, not a
    constant, so that importing the module reads neither the CPU nor JAXINFER_CPU_ISA (a bad value
    is refused where a command reports it, not as a traceback at import)."""
    return 8 if KERNEL.isa() is cpu_ffi.AVX2 else 32


def packable(k: int, n: int) -> bool:
    """Whether a `[K, N]` weight can take the kernel's packed layout: any K, N a multiple of 4."""
    return n % PACK_COLS == 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedInt8:
    """An int8 weight `w [K, N]` in the kernel's layout: `codes [N/4, 4, K]` int8 with
    `codes[b, c, k] = w[k, 4 * b + c]`, and `sums [N]` int32, `sums[n] = sum over k of w[k, n]`.
    A pytree of two arrays, so it passes through `jit`, `device_put` and the engine file as they do."""

    codes: jax.Array
    sums: jax.Array

    @property
    def dtype(self) -> jnp.dtype:
        return self.codes.dtype


def is_packed(w_q) -> bool:
    """Whether a weight is in the kernel's layout (`pack`) rather than a `[K, N]` array."""
    return isinstance(w_q, PackedInt8)


def pack(w_q: jax.Array) -> PackedInt8:
    """`[K, N]` int8 -> the kernel's layout (`PackedInt8`); traceable."""
    k, n = w_q.shape
    if not packable(k, n):
        raise ValueError(f"a [{k}, {n}] weight cannot be packed: N must be a multiple of {PACK_COLS}")
    return PackedInt8(codes=w_q.T.reshape(n // PACK_COLS, PACK_COLS, k), sums=jnp.sum(w_q, axis=0, dtype=jnp.int32))


def output_major(w_packed: PackedInt8) -> jax.Array:
    """A packed weight as `[N, K]` (each output's K weights contiguous), a free reshape: `w[K, N].T`."""
    blocks, cols, k = w_packed.codes.shape
    return w_packed.codes.reshape(blocks * cols, k)


def unpack(w_packed: PackedInt8) -> jax.Array:
    """Inverse of `pack`: -> `[K, N]`."""
    return output_major(w_packed).T


def standard_layout(w_q) -> jax.Array:
    """A weight in the `[K, N]` layout, whether it was packed or not."""
    return unpack(w_q) if is_packed(w_q) else w_q


def logical_shape(w_q) -> tuple[int, int]:
    """`(K, N)` of a weight, packed or not."""
    if is_packed(w_q):
        blocks, cols, k = w_q.codes.shape
        return k, blocks * cols
    return w_q.shape


def _weight_operands(w_packed, k: int, call: str) -> tuple[jax.Array, jax.Array]:
    """A packed weight's codes and sums as the kernel takes them, checked against x's K."""
    if (not is_packed(w_packed) or w_packed.codes.dtype != jnp.int8 or w_packed.codes.ndim != 3
            or w_packed.codes.shape[1] != PACK_COLS or logical_shape(w_packed)[0] != k
            or w_packed.sums.shape != (logical_shape(w_packed)[1],) or w_packed.sums.dtype != jnp.int32):
        got = (f"codes {w_packed.codes.shape} {w_packed.codes.dtype}, sums {w_packed.sums.shape} {w_packed.sums.dtype}"
               if is_packed(w_packed) else f"a {type(w_packed).__name__}")
        raise ValueError(f"{call} takes a weight packed by cpu_int8_dot.pack for x's K = {k} (codes [N/4, 4, K] "
                         f"int8, sums [N] int32), got {got}")
    ensure_registered()
    return w_packed.codes, w_packed.sums


def int8_dot(x_q: jax.Array, w_packed: PackedInt8) -> jax.Array:
    """`x_q [M, K] int8 @ w [K, N] int8` -> `[M, N] int32` exactly, w given packed (`pack`)."""
    if x_q.dtype != jnp.int8 or x_q.ndim != 2:
        raise ValueError(f"int8_dot takes x [M, K] int8, got {x_q.shape} {x_q.dtype}")
    codes, sums = _weight_operands(w_packed, x_q.shape[1], "int8_dot")
    out = jax.ShapeDtypeStruct((x_q.shape[0], logical_shape(w_packed)[1]), jnp.int32)
    return jax.ffi.ffi_call(TARGET, out)(x_q, codes, sums)


def _w8a8_operands(x: jax.Array, w_packed: PackedInt8, w_scale: jax.Array, live_rows: jax.Array | None,
                   call: str) -> tuple[tuple, jax.Array]:
    """The W8A8 calls' own operands (x as float32, the packed weight's codes and sums, its scales
    [N]), checked, and the live-row count."""
    if x.ndim != 2:
        raise ValueError(f"{call} takes x [M, K], got {x.shape}")
    codes, sums = _weight_operands(w_packed, x.shape[1], call)
    scale = jnp.broadcast_to(w_scale.astype(jnp.float32), (logical_shape(w_packed)[1],))
    return (x.astype(jnp.float32), codes, sums, scale), cpu_ffi.live_row_operand(x.shape[0], live_rows)


def w8a8_dot(x: jax.Array, w_packed: jax.Array, w_scale: jax.Array, live_rows: jax.Array | None = None) -> jax.Array:
    """W8A8 in one kernel call: `x [M, K]` float quantized per row to int8 exactly as
    `activation_quant.quantize_per_token` does, times the packed int8 weight, rescaled by the row
    scales and `w_scale` ([N], or [] broadcast) -> `[M, N]` float32."""
    operands, live = _w8a8_operands(x, w_packed, w_scale, live_rows, "w8a8_dot")
    out = jax.ShapeDtypeStruct((x.shape[0], logical_shape(w_packed)[1]), jnp.float32)
    return jax.ffi.ffi_call(W8A8_TARGET, out)(*operands, live)


def w8a8_add_norm(x: jax.Array, w_packed: jax.Array, w_scale: jax.Array, residual: jax.Array, norm_weight: jax.Array,
                  eps: float, live_rows: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`residual [M, N] f32 + w8a8_dot(x, ...)` and its RMSNorm times `norm_weight [N]`, both float32."""
    operands, live = _w8a8_operands(x, w_packed, w_scale, live_rows, ADD_NORM_TARGET)
    return cpu_row_passes.add_norm(ADD_NORM_TARGET, operands, live, logical_shape(w_packed)[1], residual,
                                   norm_weight.astype(jnp.float32), eps, jnp.float32)


def w8a8_qkv_rope(x: jax.Array, w_packed: jax.Array, w_scale: jax.Array, cos: jax.Array, sin: jax.Array,
                  kv_heads: int, q_per_kv: int,
                  live_rows: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k and v of `w8a8_dot(x, ...)` over a grouped qkv weight, q and k rotated by the rows' `cos`
    and `sin` [M, D / 2] float32, all float32."""
    operands, live = _w8a8_operands(x, w_packed, w_scale, live_rows, QKV_ROPE_TARGET)
    return cpu_row_passes.qkv_rope(QKV_ROPE_TARGET, operands, live, logical_shape(w_packed)[1], cos, sin, kv_heads,
                                   q_per_kv, jnp.float32)


def w8a8_swiglu(x: jax.Array, w_packed: jax.Array, w_scale: jax.Array,
                live_rows: jax.Array | None = None) -> jax.Array:
    """silu(gate) * up of `w8a8_dot(x, ...)` over a gate_up weight (gate_i and up_i side by side), as
    float32 [M, F]."""
    operands, live = _w8a8_operands(x, w_packed, w_scale, live_rows, SWIGLU_TARGET)
    return cpu_row_passes.swiglu(SWIGLU_TARGET, operands, live, logical_shape(w_packed)[1], jnp.float32)


def serves(rows: int, w_q: jax.Array) -> bool:
    """Whether `fastest_int8_dot` runs the kernel (rather than XLA's dot) for `rows` activation rows."""
    return is_packed(w_q) and rows <= max_rows() and available()


def fastest_int8_dot(x_q: jax.Array, w_q: jax.Array) -> jax.Array:
    """`x_q [M, K] int8 @ w_q` (`[K, N]` or packed) -> `[M, N] int32` exactly, by the faster path."""
    if serves(x_q.shape[0], w_q):
        return int8_dot(x_q, w_q)
    if is_packed(w_q):  # more rows than the kernel serves (prefill): XLA's dot reads the same bytes
        return lax.dot_general(x_q, output_major(w_q), (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    return min_rows_dot(x_q, w_q, jnp.int32)
