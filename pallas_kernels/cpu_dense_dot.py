"""A matmul of activation rows by a float32 or bfloat16 weight on x86 CPUs (AVX2 or AVX-512; AMX
or AVX512-BF16 for bfloat16): a C++ kernel called through XLA FFI, reading the weight in its own
`[K, N]` layout, or, for bfloat16 on AMX CPUs, as the AMX panels an engine stores it in
(`pack_panels`).

Every call takes `live_rows` (a traced int32 scalar; default M): it computes the first live_rows rows
and returns zeros in the rest, so an engine step's padding rows (its shape bucket's, past its real
tokens) cost nothing.

    dense_dot(x [M, K], w [K, N]) -> [M, N] f32   x and w both float32 or both bfloat16; float32
        sums. Takes (`serves`): N % 16 == 0; float32 up to MAX_FMA_ROWS rows; bfloat16 any rows on
        a CPU with AMX-BF16 (its AMX loop from 8 rows where K % 32 == 0 and N % 32 == 0, the FMA
        loop otherwise) or without AVX-512 (the GEMM loop beyond MAX_FMA_ROWS), up to MAX_DP_ROWS
        where the CPU has AVX512-BF16 (its loop from 2 rows where K is even), else up to
        MAX_FMA_ROWS
    serves(rows, w) -> bool   whether dense_dot takes this weight and row count
    pack_panels(w [K, N]) -> [N / 32, K / 32, 2, 16, 16, 2]   a bfloat16 weight as AMX panels, which
        every call here takes in place of w, at any rows (packs_panels says which weights fit);
        unpack_panels gives w back, weight_shape (K, N) of either
    dense_swiglu(x [M, K], w_gate_up [K, 2F]) -> [M, F] bf16   silu(gate) * up of the product,
        gate_i and up_i interleaved by column (jaxinfer.model.llama), bfloat16 on a CPU with AMX-BF16
    serves_swiglu(rows, w) -> bool   whether dense_swiglu takes them
    dense_add_norm(x [M, K], w [K, N], residual [M, N], norm_weight [N], eps)
        -> (residual + x @ w [M, N] f32, its RMSNorm [M, N] bf16)   bfloat16 x and w, the product
        rounded to bfloat16 before the add (a layer's output projection, the residual add and the
        next norm in one call)
    serves_add_norm(rows, w) -> bool   whether dense_add_norm takes them
    dense_qkv_rope(x [M, K], w_qkv [K, N], cos, sin [M, D / 2], kv_heads, q_per_kv)
        -> (q [M, kv_heads * q_per_kv * D], k, v [M, kv_heads * D]) bf16   bfloat16 x and w, whose
        columns group each kv head's query heads, k and v (jaxinfer.model.llama); q and k rotated
    serves_qkv_rope(rows, w, head_dim) -> bool   whether dense_qkv_rope takes them
    available() -> bool       whether it runs here (x86-64 with AVX2 and FMA, a C++ compiler, the CPU
                              backend); builds and registers it on first use

Why: a decode step of an unquantized engine is its weights streaming from memory, and XLA:CPU's
float32 dot streams them at 20 GB/s for one row and at 9-14 GB/s for 2-8 rows (a few-row dot is
still a matrix-vector product there, weight read once per row block); its bfloat16 dot with
float32 sums is worse at one row (1-2 GB/s) and streams 5-11 GB/s at 2-8. The kernel reads every
weight once for all rows, in address order, split over XLA's intra-op thread pool; for bfloat16
beyond a few rows it multiplies on AMX tiles, or with vdpbf16ps on CPUs without AMX (the .cc
explains the loops). Measured on the project's Xeon VM (30 layers of SmolLM2's four weight shapes
and its 576 x 49152 head, medians of 15 calls, noisy: repeats differ by about 10%), milliseconds:

    rows                         1      2      4      8
    XLA's dot, float32 (538 MB)  26.2   38.7   49.0   60.1
    this kernel, float32        23.4   24.7   27.4   35.3

On an AMD EPYC (Zen 4, AVX512-BF16, no AMX) the AVX512-BF16 loop took a bfloat16 engine's decode
at batch 2 / 4 / 8 from 80-85 / 125-133 / 155-162 tokens/s (the FMA loop) to 90-91 / 158-173 /
243-257; passes of 8 rows instead of 4 took batch 6 / 8 to 1.08 / 1.12x, and the loop taking the
9-24-row buckets from XLA's bfloat16 dot (which computes a bucket's padding rows) took batch 12 /
16 / 18 / 20 / 24 to 1.38 / 1.27 / 1.19 / 1.20 / 0.95x (MAX_DP_ROWS).

CPUs without AVX-512 take the AVX2 build: the FMA loop alone, on 8-lane registers. On an AMD EPYC
Zen 2 VM (AVX2 only), against XLA's bfloat16 dot (which converts the weight to float32 at every
call there), per matmul: 3.7-7.4x faster at one row (the 576 x 49152 head in 5.3 ms against 34.1),
0.94-1.45x at 4 rows, 0.67-1.14x at 8 (benchmarks/bench_dense_dot.py, one run). It took the
default bfloat16 engine's batch-1 decode there from about 3 tokens/s to 33-43. Reading a bfloat16
weight two columns per 32-bit lane (split by a shift and a mask) instead of widening each value took
the 576 x 49152 head from 3.5 to 2.3 ms (16 -> 25 GB/s) and the engine's batch-1 decode from
57.7-64.9 to 65.9-68.0 tokens/s (A/B, three runs each). Then keeping four rows' sums in registers
while a weight row meets them all (rather than one row's chain of multiply-adds after another) took
its batch-4 / batch-8 decode from 127-132 / 161-185 to 161-164 / 196-225 tokens/s (A/B, three runs).
One row then read each weight as 8 runs of rows at once, each in address order, which the
prefetchers serve faster than one run or the 8-row passes: batch-1 decode 51.8-68.2 -> 67.2-85.7
tokens/s, 1.23-1.36x in 8 alternating pairs (0.58-0.68 -> 0.73-0.89 of the roofline).

Prefill steps on that VM ran XLA's bfloat16 dot at 80-107 GFLOP/s (of a 214 peak); the AVX2
build's GEMM loop, a 6 x 16 register tile over weight panels packed as float32, runs the model's
shapes at 64-256 rows 1.2-1.5x faster (benchmarks/bench_dense_dot.py), and took a bfloat16 engine's
TTFT at 512 / 128 tokens from 1.19 / 0.30 s to 0.77-0.84 / 0.19-0.22 s and its decode at batch 32
from 221-234 to 264-289 tokens/s (A/B, two runs each).

The sums run in another order than XLA's, so results differ from its dot in the last bits.
`jaxinfer.runner.step` routes a one-device CPU engine's float32 and bfloat16 weights here for the
row counts it serves (the reference generation keeps XLA's dot, so it still checks the engine).

Build: `pallas_kernels.cpu_ffi` compiles the source once per machine and registers it as the FFI
target `jaxinfer_dense_dot`.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from pallas_kernels import cpu_ffi, cpu_row_passes

TARGET = "jaxinfer_dense_dot"
SWIGLU_TARGET = "jaxinfer_dense_swiglu"
ADD_NORM_TARGET = "jaxinfer_dense_add_norm"
QKV_ROPE_TARGET = "jaxinfer_dense_qkv_rope"
KERNEL = cpu_ffi.CpuKernel(
    "CPU dense matmul kernel", (TARGET, SWIGLU_TARGET, ADD_NORM_TARGET, QKV_ROPE_TARGET),
    Path(__file__).with_suffix(".cc"),
    (cpu_ffi.Isa(("-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-mamx-tile", "-mamx-bf16"),
                 frozenset({"avx2", "fma", "avx512f"})), cpu_ffi.AVX2))
available = KERNEL.available
# CPUs without AVX-512 take the AVX2 build, whose bfloat16 steps beyond MAX_FMA_ROWS rows run in its
# GEMM loop.
GEMM_BF16 = KERNEL.isa() is cpu_ffi.AVX2
# The FMA loop's rows: it slows with rows (14-16 GB/s at 8, 22-23 at one for float32) as its
# multiply-adds per byte grow, so bigger float32 steps keep XLA's dot.
MAX_FMA_ROWS = 8
# bfloat16 steps of any size run here where the CPU has AMX-BF16 (the kernel still falls back to its
# FMA loop where the OS refuses the tile state, slower but exact). Without AMX, bfloat16 steps of
# 2 to MAX_DP_ROWS rows take the AVX512-BF16 loop where the CPU has it (DP_BF16).
AMX_BF16 = "amx_bf16" in cpu_ffi.cpu_flags()
DP_BF16 = "avx512_bf16" in cpu_ffi.cpu_flags() and not AMX_BF16
# Beyond 8 rows that loop walks each rectangle once per 8 rows, and it computes only a step's real
# rows, where XLA's dot computes the whole bucket. Zen 4 VM, a bfloat16 engine's decode, engines
# built each way in one process, alternating by round (five or six rounds, 2026-12-07): the 16-row
# bucket here against XLA's took batch 12 / 16 to 441.2 / 513.8 tokens/s from 319.3 / 404.2 (1.38 /
# 1.27x, every round); the 24-row bucket too, batch 18 / 20 / 24 to 1.19 / 1.20 / 0.95x; the
# 32-row bucket too, batch 28 / 32 to 0.96 / 0.99x, so it stays with XLA.
MAX_DP_ROWS = 24
LANE = 16
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# A bfloat16 weight's AMX panels: 32 columns each over all of K, as 16-row B tiles of (k, k + 1) pairs.
PANEL_COLS = 32
PANEL_K = 32
PANEL_TILE = (2, 16, 16, 2)


def packs_panels(w) -> bool:
    """Whether `pack_panels` takes `w`: a `[K, N]` weight with K and N multiples of 32 (the kernel
    takes bfloat16 panels; a float32 weight may be packed before it is cast). The AMX loop takes
    panels at any rows; where AMX does not run (a CPU without it, or the OS refused the tile state)
    a call unpacks them first, slowly."""
    return getattr(w, "ndim", 0) == 2 and w.shape[0] % PANEL_K == 0 and w.shape[1] % PANEL_COLS == 0


def pack_panels(w):
    """`w [K, N]` as its AMX panels `[N / 32, K / 32, 2, 16, 16, 2]`: panel j, K step s, half h
    (16 columns), tile row i, column c, pair element e hold w[32 s + 2 i + e, 32 j + 16 h + c]. The
    AMX loop reads them in address order, where it otherwise packs every call's weight into tiles
    again. numpy or jax arrays (traceable)."""
    k, n = w.shape
    return w.reshape(k // PANEL_K, 16, 2, n // PANEL_COLS, 2, 16).transpose(3, 0, 4, 1, 5, 2)


def unpack_panels(panels):
    """The `[K, N]` weight whose panels these are (`pack_panels`)."""
    k, n = weight_shape(panels)
    return panels.transpose(1, 3, 5, 0, 2, 4).reshape(k, n)


def is_panels(w) -> bool:
    return getattr(w, "ndim", 0) == 6 and tuple(w.shape[2:]) == PANEL_TILE


def weight_shape(w) -> tuple[int, int]:
    """`(K, N)` of a `[K, N]` weight or of its panels."""
    return (w.shape[1] * PANEL_K, w.shape[0] * PANEL_COLS) if is_panels(w) else tuple(w.shape)


def serves(rows: int, w) -> bool:
    """Whether `dense_dot` takes `rows` activation rows against the weight `w` (`[K, N]`, or its
    panels: bfloat16, any rows)."""
    if is_panels(w):
        return w.dtype == jnp.bfloat16 and rows >= 1
    if not (getattr(w, "ndim", 0) == 2 and w.dtype in DTYPES and w.shape[1] % LANE == 0 and rows >= 1):
        return False
    if w.dtype == jnp.bfloat16 and (AMX_BF16 or GEMM_BF16):
        return True
    return rows <= (MAX_DP_ROWS if w.dtype == jnp.bfloat16 and DP_BF16 else MAX_FMA_ROWS)


def serves_swiglu(rows: int, w) -> bool:
    """Whether `dense_swiglu` takes `rows` activation rows against the gate_up weight `w`: bfloat16
    on a CPU with AMX-BF16, whose AMX items take the SwiGLU of their part of the product while it is
    in L2 (other row counts: one pass after the product)."""
    return (AMX_BF16 and not GEMM_BF16 and serves(rows, w) and w.dtype == jnp.bfloat16
            and weight_shape(w)[1] % (2 * LANE) == 0)


def dense_swiglu(x: jax.Array, w_gate_up: jax.Array, live_rows: jax.Array | None = None) -> jax.Array:
    """silu(gate) * up of `x [M, K] @ w_gate_up [K, 2F]`, whose columns interleave gate_i and up_i,
    as bfloat16 [M, F] (module docstring): gate and up rounded to bfloat16 first, as
    `jaxinfer.model.layers.swiglu` takes them from `linear`, then float32 math."""
    k, n = weight_shape(w_gate_up)
    if not (x.ndim == 2 and x.dtype == w_gate_up.dtype and x.shape[1] == k and serves_swiglu(x.shape[0], w_gate_up)):
        raise ValueError(f"dense_swiglu takes bfloat16 x [M, K] and w [K, N] with N a multiple of {2 * LANE} on a "
                         f"CPU with AMX-BF16; got {x.shape} {x.dtype} and {w_gate_up.shape} {w_gate_up.dtype}")
    KERNEL.ensure_registered()
    return cpu_row_passes.swiglu(SWIGLU_TARGET, (x, w_gate_up), cpu_ffi.live_row_operand(x.shape[0], live_rows), n,
                                 jnp.bfloat16)


def serves_add_norm(rows: int, w) -> bool:
    """Whether `dense_add_norm` takes `rows` activation rows against the weight `w`: a bfloat16
    weight at the row counts `dense_dot` takes."""
    return getattr(w, "dtype", None) == jnp.bfloat16 and serves(rows, w)


def dense_add_norm(x: jax.Array, w: jax.Array, residual: jax.Array, norm_weight: jax.Array,
                   eps: float, live_rows: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`residual [M, N] f32 + x [M, K] @ w [K, N]` and its RMSNorm times `norm_weight [N]`, as
    (float32 [M, N], bfloat16 [M, N]) (module docstring): the product rounded to bfloat16 first, as
    `jaxinfer.model.layers.residual_rms_norm` takes it from `linear`, then float32 math. The
    residual's buffer is reused for the sum."""
    k, n = weight_shape(w)
    if not (x.ndim == 2 and x.dtype == w.dtype and x.shape[1] == k and serves_add_norm(x.shape[0], w)
            and norm_weight.dtype in DTYPES):
        raise ValueError(f"dense_add_norm takes bfloat16 x [M, K] and w [K, N] (N a multiple of {LANE}) and a float32 "
                         f"or bfloat16 norm weight; got {x.shape} {x.dtype}, {w.shape} {w.dtype}, {norm_weight.dtype}")
    KERNEL.ensure_registered()
    return cpu_row_passes.add_norm(ADD_NORM_TARGET, (x, w), cpu_ffi.live_row_operand(x.shape[0], live_rows), n,
                                   residual, norm_weight, eps, jnp.bfloat16)


def serves_qkv_rope(rows: int, w, head_dim: int) -> bool:
    """Whether `dense_qkv_rope` takes `rows` activation rows against the grouped qkv weight `w` of
    heads of `head_dim`: a bfloat16 weight at the row counts `dense_dot` takes, head_dim a multiple
    of 2 x LANE (whole registers in each half of a head)."""
    return getattr(w, "dtype", None) == jnp.bfloat16 and head_dim % (2 * LANE) == 0 and serves(rows, w)


def dense_qkv_rope(x: jax.Array, w: jax.Array, cos: jax.Array, sin: jax.Array, kv_heads: int,
                   q_per_kv: int, live_rows: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k and v of `x [M, K] @ w [K, kv_heads * (q_per_kv + 2) * D]`, q and k rotated by the rows'
    `cos` and `sin` [M, D / 2] float32, all bfloat16 (module docstring): every value rounded to
    bfloat16 first, as `jaxinfer.model.llama` takes them from `linear`, then `apply_rope`'s float32
    math."""
    k, n = weight_shape(w)
    if not (x.ndim == 2 and x.dtype == w.dtype and x.shape[1] == k
            and serves_qkv_rope(x.shape[0], w, 2 * cos.shape[-1])):
        raise ValueError(f"dense_qkv_rope takes bfloat16 x [M, K] and w [K, N]; got {x.shape} {x.dtype} and "
                         f"{w.shape} {w.dtype}")
    KERNEL.ensure_registered()
    return cpu_row_passes.qkv_rope(QKV_ROPE_TARGET, (x, w), cpu_ffi.live_row_operand(x.shape[0], live_rows), n, cos,
                                   sin, kv_heads, q_per_kv, jnp.bfloat16)


def dense_dot(x: jax.Array, w: jax.Array, live_rows: jax.Array | None = None) -> jax.Array:
    """`x [M, K] @ w [K, N]` in float32 by the kernel (module docstring)."""
    k, n = weight_shape(w)
    if not (x.ndim == 2 and x.dtype == w.dtype and x.shape[1] == k and serves(x.shape[0], w)):
        raise ValueError(f"dense_dot takes x [M, K] and w [K, N] of one dtype (float32 with 1 <= M <= "
                         f"{MAX_FMA_ROWS}, or bfloat16), N a multiple of {LANE}; got {x.shape} {x.dtype} and "
                         f"{w.shape} {w.dtype}")
    KERNEL.ensure_registered()
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x, w, cpu_ffi.live_row_operand(x.shape[0], live_rows))
