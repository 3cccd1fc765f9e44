"""W4A8 on x86 CPUs: group-wise int4 weights times per-group int8 activations, a C++ kernel called
through XLA FFI, reading int4 weights packed for it. The arithmetic of llama.cpp's Q4_1 x Q8_1 dot.

    pack(packed [K/2, N] u8, scale [K/G, N] f16, offset) -> (codes [N/16, K/8, 16, 4] u8,
                        scale [N/16, K/G, 16] f16, offset likewise): the kernel's layout from
                        int4_matmul's (`packable(K, N, G)`: N % 16 == 0, G % 16 == 0); unpack()
                        is its inverse
    w4a8_dot(x [M, K] float, codes, scale, offset, live_rows=None) -> [M, N] float32: x quantized
                        to int8 per group of G (w4a8_matmul.quantize_groups), the exact integer dot
                        of each group, both scales and the offsets (see the .cc); only the first
                        live_rows rows (a traced int32 scalar, default M), zeros after them
                        (`cpu_ffi.live_row_operand`)
    w4a8_add_norm(x, codes, scale, offset, residual [M, N] f32, norm_weight [N], eps, live_rows=None)
                        -> (residual + x w [M, N] f32, its RMSNorm times norm_weight [M, N] f32):
                        an output projection, the residual add and the next RMSNorm in one call
                        (the residual's buffer reused for the sum)
    w4a8_qkv_rope(x, codes, scale, offset, cos, sin [M, D / 2] f32, kv_heads, q_per_kv, live_rows=None)
                        -> (q [M, kv_heads * q_per_kv * D], k, v [M, kv_heads * D]) f32: the grouped
                        qkv projection (jaxinfer.model.llama) split into heads, q and k rotated
                        (`apply_rope`), in one call; D / 2 a multiple of 16 (cpu_row_passes.py)
    w4a8_swiglu(x, codes, scale, offset, live_rows=None) -> silu(gate) * up [M, N / 2] f32: the
                        gate_up projection (gate_i and up_i side by side, jaxinfer.model.llama) and
                        the MLP's SwiGLU in one call; N / 2 a multiple of 16
    available() -> bool whether it runs here (x86-64 with AVX2, FMA and F16C, a C++ compiler, the
                        CPU backend; the AVX-512 VNNI loop where the CPU has it); builds and
                        registers it on first use

Why: XLA:CPU has no fused unpack-and-dot, so an int4 weight ran as a float copy made every step
(int4 engines decoded slower than int8 ones). The kernel reads 5 bits a weight (codes, plus an
f16 scale and offset per 32) and keeps the sums in 16 output lanes of a register, so only each
group's end costs float work. Every row count runs here, prefill included: a weight block (16
outputs x K/2 bytes) stays in L1 while up to 8 rows at a time walk it. Measured on the project's
Xeon VM (30 layers of SmolLM2's four weight shapes, medians of 15 calls, noisy), milliseconds:

    rows                                  1      2      4      8     16     32    128
    this kernel (63 MB of codes+scales)  3.0    4.0    4.6    5.9    8.9   15-27    72
    cpu_int8_dot's W8A8 (106 MB)         4.5    5.2    5.7    5.9    6.8   10-22    42

so w4a8 decodes faster where decode is bandwidth-bound (to 8 rows) and W8A8, whose larger steps
run on AMX, is faster beyond. An AMX path (tdpbsud on unpacked codes, as cpu_int8_dot does from 5
rows) was slower at 16 rows and no faster at 32-128 (11.3 / 19.4 / 70 ms against 8.9 / 15-27 /
72): each group of 32 must leave the tile unit for its scales, so every tdpbsud does half a
tile's K and then waits for a tile store.

CPUs without AVX-512 VNNI take the AVX2 build of the same source (`vpmaddubsw`, up to 4 rows per
pass). On an AMD EPYC Zen 2 VM (AVX2 only; a plain AVX2 read reaches 11 GB/s on one thread, 17 on
two), the 30 layers at 1 / 2 / 4 / 8 rows took 5.3-5.6 / 5.8-6.9 / 7.3-7.5 / 13.3-13.8 ms (two
runs), where XLA's formulation had taken a w4a8 engine's batch-1 step to 173 ms.

The three fused calls run the product's rows through a pass (cpu_row_passes.h, shared with
cpu_dense_dot) in the call that computes it, in place of XLA's operations between the kernels (each
norm's sum of squares, rsqrt and multiplies, the residual adds, RoPE's slices, rotations and
concatenation, the SwiGLU: about 13 a layer). On the Zen 4 VM that took a float32 w4a8 engine's
decode at batch 1 / 2 / 4 / 8 to 1.02 / 1.04 / 1.02 / 1.02x (`jaxinfer bench compare`, eight
alternating rounds, 2026-12-07), with the same held-out KL (pallas_kernels/README.md).

Build: `pallas_kernels.cpu_ffi` compiles the source once per machine and registers it as the FFI
targets `jaxinfer_w4a8_dot`, `jaxinfer_w4a8_add_norm`, `jaxinfer_w4a8_qkv_rope` and `jaxinfer_w4a8_swiglu`.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from pallas_kernels import cpu_ffi, cpu_row_passes
from pallas_kernels.int4_matmul import pack_int4, unpack_int4

TARGET = "jaxinfer_w4a8_dot"
ADD_NORM_TARGET = "jaxinfer_w4a8_add_norm"
QKV_ROPE_TARGET = "jaxinfer_w4a8_qkv_rope"
SWIGLU_TARGET = "jaxinfer_w4a8_swiglu"
AVX512_VNNI = cpu_ffi.Isa(("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"),
                          frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}))
KERNEL = cpu_ffi.CpuKernel("CPU int4 kernel", (TARGET, ADD_NORM_TARGET, QKV_ROPE_TARGET, SWIGLU_TARGET),
                           Path(__file__).with_suffix(".cc"), (AVX512_VNNI, cpu_ffi.AVX2))
available = KERNEL.available
BLOCK_COLS = 16
OCTET = 8
# The kernel quantizes activations 16 floats at a time.
GROUP_MULTIPLE = 16


def packable(k: int, n: int, group_size: int) -> bool:
    """Whether a `[K, N]` int4 weight in groups of `group_size` can take the kernel's layout."""
    return n % BLOCK_COLS == 0 and group_size % GROUP_MULTIPLE == 0 and k % group_size == 0


def is_packed(codes: jax.Array) -> bool:
    """Whether int4 codes are in the kernel's layout (`pack`) rather than int4_matmul's `[K/2, N]`."""
    return codes.ndim == 4


def logical_shape(codes: jax.Array) -> tuple[int, int]:
    """`(K, N)` of an int4 weight from its codes, in either layout."""
    if is_packed(codes):
        blocks, octets, _, _ = codes.shape
        return octets * OCTET, blocks * BLOCK_COLS
    half_k, n = codes.shape
    return 2 * half_k, n


def _pack_group_params(param: jax.Array) -> jax.Array:
    groups, n = param.shape
    return param.reshape(groups, n // BLOCK_COLS, BLOCK_COLS).transpose(1, 0, 2)


def _unpack_group_params(param: jax.Array) -> jax.Array:
    blocks, groups, _ = param.shape
    return param.transpose(1, 0, 2).reshape(groups, blocks * BLOCK_COLS)


def pack(packed: jax.Array, scale: jax.Array, offset: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """int4_matmul's `(packed [K/2, N], scale [K/G, N], offset)` -> the kernel's layout (.cc header)."""
    k, n = logical_shape(packed)
    group_size = k // scale.shape[0]
    if not packable(k, n, group_size):
        raise ValueError(f"a [{k}, {n}] int4 weight in groups of {group_size} cannot be packed: N must be a "
                         f"multiple of {BLOCK_COLS} and the group size a multiple of {GROUP_MULTIPLE}")
    q = unpack_int4(packed, group_size)  # [K, N]: k = 8 o + 4 h + j, n = 16 b + r
    by_octet = q.reshape(k // OCTET, 2, 4, n // BLOCK_COLS, BLOCK_COLS).transpose(3, 0, 4, 2, 1)
    codes = by_octet[..., 0] | (by_octet[..., 1] << 4)
    return codes, _pack_group_params(scale), _pack_group_params(offset)


def unpack(codes: jax.Array, scale: jax.Array, offset: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Inverse of `pack`."""
    k, n = logical_shape(codes)
    halves = jnp.stack([codes & 0xF, codes >> 4], axis=-1)  # [b, o, r, j, h]
    q = halves.transpose(1, 4, 3, 0, 2).reshape(k, n)
    scale, offset = _unpack_group_params(scale), _unpack_group_params(offset)
    return pack_int4(q, k // scale.shape[0]), scale, offset


def _weight_operands(x: jax.Array, codes: jax.Array, scale: jax.Array, offset: jax.Array,
                     live_rows: jax.Array | None, call: str) -> tuple[tuple, jax.Array]:
    """The kernel's own operands (x as float32, the weight's three arrays), checked, and the live-row
    count."""
    k, _ = logical_shape(codes)
    if (x.ndim != 2 or x.shape[1] != k or not is_packed(codes) or codes.dtype != jnp.uint8
            or scale.ndim != 3 or scale.shape != offset.shape):
        raise ValueError(f"{call} takes x [M, K] and codes [N/16, K/8, 16, 4] uint8 with scale and offset "
                         f"[N/16, K/G, 16], got {x.shape}, {codes.shape} {codes.dtype}, {scale.shape}, {offset.shape}")
    KERNEL.ensure_registered()
    operands = (x.astype(jnp.float32), codes, scale.astype(jnp.float16), offset.astype(jnp.float16))
    return operands, cpu_ffi.live_row_operand(x.shape[0], live_rows)


def w4a8_dot(x: jax.Array, codes: jax.Array, scale: jax.Array, offset: jax.Array,
             live_rows: jax.Array | None = None) -> jax.Array:
    """`x [M, K]` float times the packed int4 weight, W4A8 (module docstring) -> `[M, N]` float32."""
    operands, live = _weight_operands(x, codes, scale, offset, live_rows, "w4a8_dot")
    out = jax.ShapeDtypeStruct((x.shape[0], logical_shape(codes)[1]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(*operands, live)


def w4a8_add_norm(x: jax.Array, codes: jax.Array, scale: jax.Array, offset: jax.Array, residual: jax.Array,
                  norm_weight: jax.Array, eps: float,
                  live_rows: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`residual [M, N] f32 + x [M, K] @ w` and its RMSNorm times `norm_weight [N]`, both float32
    (module docstring)."""
    operands, live = _weight_operands(x, codes, scale, offset, live_rows, ADD_NORM_TARGET)
    return cpu_row_passes.add_norm(ADD_NORM_TARGET, operands, live, logical_shape(codes)[1], residual,
                                   norm_weight.astype(jnp.float32), eps, jnp.float32)


def w4a8_qkv_rope(x: jax.Array, codes: jax.Array, scale: jax.Array, offset: jax.Array, cos: jax.Array,
                  sin: jax.Array, kv_heads: int, q_per_kv: int,
                  live_rows: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k and v of `x [M, K] @ w [K, kv_heads * (q_per_kv + 2) * D]`, q and k rotated by the rows'
    `cos` and `sin` [M, D / 2] float32, all float32 (module docstring)."""
    operands, live = _weight_operands(x, codes, scale, offset, live_rows, QKV_ROPE_TARGET)
    return cpu_row_passes.qkv_rope(QKV_ROPE_TARGET, operands, live, logical_shape(codes)[1], cos, sin, kv_heads,
                                   q_per_kv, jnp.float32)


def w4a8_swiglu(x: jax.Array, codes: jax.Array, scale: jax.Array, offset: jax.Array,
                live_rows: jax.Array | None = None) -> jax.Array:
    """silu(gate) * up of `x [M, K] @ w_gate_up [K, 2F]`, whose columns interleave gate_i and up_i,
    as float32 [M, F] (module docstring)."""
    operands, live = _weight_operands(x, codes, scale, offset, live_rows, SWIGLU_TARGET)
    return cpu_row_passes.swiglu(SWIGLU_TARGET, operands, live, logical_shape(codes)[1], jnp.float32)
