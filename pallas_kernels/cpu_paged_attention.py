"""Paged attention of a ragged batch on x86 CPUs: a C++ kernel called through XLA FFI.

    paged_attention(scaled_q [T, num_q_heads, head_dim] float32, cache: LayerKVCache,
                    metadata: AttentionMetadata, soft_cap: float | None) -> [T, num_q_heads, head_dim] float32
        `ragged_paged_attention`'s result for q already multiplied by sm_scale: decodes and prefill
        chunks alike, GQA, rows of padding tokens zero. K/V in any pool storage dtype (float32,
        bfloat16, int8 and fp8 with their scales).
    serves(cache) -> bool   whether the kernel runs here for this pool (`available()` and a head_dim
                            that is a multiple of 16)
    available() -> bool     x86-64 with AVX2 and FMA, a C++ compiler, the CPU backend; builds and
                            registers the kernel on first use (`pallas_kernels.cpu_ffi`; its AVX-512
                            build where the CPU has it)

Why a kernel: XLA's path (`ragged_paged_attention_xla`) gathers whole 128-position chunks, runs a
loop with a dynamic trip count and merges partial softmaxes: about 100 us per layer for decodes at
any context on the project's 2-core CPU (3-4 ms of a 30-layer batch-1 step), and for a 128-token
prefill of the default model 32 ms of its 110. The kernel (`cpu_paged_attention.cc`, which explains
its two loops) reads each K and V row a decode or a prefill tile needs once, in pool order; its
figures are in benchmarks/bench_paged_attention.py's output.

Tensor parallelism: GSPMD does not partition a custom call (it would gather the whole pool onto
every device), so the engine runs the kernel only on a one-device mesh (`jaxinfer.runner.step`).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.cache.attention_metadata import AttentionMetadata
from jaxinfer.cache.kv_pool import LayerKVCache
from pallas_kernels.cpu_ffi import AVX2, AVX512, CpuKernel, Isa, cpu_flags

TARGET = "jaxinfer_paged_attention"
# The AVX-512 build also holds the bfloat16 prefill products, which it runs where the CPU has AMX-BF16
# or AVX512-BF16 (checked at run time, as the dense kernel does).
KERNEL = CpuKernel("CPU paged attention kernel", (TARGET,), Path(__file__).with_suffix(".cc"),
                   (Isa(AVX512.compile_flags + ("-mavx512bw", "-mavx512bf16", "-mamx-tile", "-mamx-bf16"),
                        AVX512.cpu_flags), AVX2))
available = KERNEL.available
# The kernel's decode loop takes head_dim in whole groups of 16 features (two 8-float registers).
HEAD_DIM_MULTIPLE = 16
# Prefill chunks over a bfloat16 pool multiply in bfloat16 where the CPU has AMX-BF16 (on tiles) or
# AVX512-BF16 (vdpbf16ps), with q and the softmax weights rounded to bfloat16 (the .cc), so they
# agree with float32 attention to bfloat16's precision (2^-8 of the output's scale; K and V are
# bfloat16 already). Elsewhere the kernel sums float32 products of float32 values.
BF16_PREFILL_TOLERANCE = 2.0 ** -7
# The AVX512-BF16 products read K in groups of this many positions in place, inside one block.
DP_BF16_POSITIONS = 8


def serves(cache: LayerKVCache) -> bool:
    """Whether `paged_attention` can run for this pool here."""
    return cache.head_dim % HEAD_DIM_MULTIPLE == 0 and available()


def bf16_prefill_tolerance(cache: LayerKVCache) -> float | None:
    """BF16_PREFILL_TOLERANCE where this pool's prefill chunks multiply in bfloat16 here, else None: the
    error, relative to the output's largest magnitude, that the kernel's results may carry. That is a
    bfloat16 pool on a CPU that takes the AVX-512 build and has AMX-BF16 (block_size % 16 == 0,
    head_dim % 32 == 0) or AVX512-BF16 (block_size % DP_BF16_POSITIONS == 0)."""
    if not available() or KERNEL.isa() is AVX2 or cache.k.dtype != jnp.bfloat16:
        return None
    flags = cpu_flags()
    amx = "amx_bf16" in flags and cache.block_size % 16 == 0 and cache.head_dim % 32 == 0
    dp = "avx512_bf16" in flags and cache.block_size % DP_BF16_POSITIONS == 0
    return BF16_PREFILL_TOLERANCE if amx or dp else None


def paged_attention(scaled_q: jax.Array, cache: LayerKVCache, metadata: AttentionMetadata,
                    soft_cap: float | None) -> jax.Array:
    """See the module docstring; the arguments are those `ragged_paged_attention` checked."""
    KERNEL.ensure_registered()
    no_scale = jnp.zeros((0,), jnp.float32)
    scales = (cache.k_scale, cache.v_scale) if cache.quantized else (no_scale, no_scale)
    out = jax.ShapeDtypeStruct(scaled_q.shape, jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(
        scaled_q.astype(jnp.float32), cache.k, cache.v, *scales, metadata.block_tables, metadata.seq_lens,
        metadata.query_start_loc, soft_cap=np.float32(soft_cap or 0.0))
