"""Group-wise int4 weight-only matmul (W4A16) and the int4 packing it reads.

Weight format (K input rows in groups of G consecutive rows, N output columns):
    packed  [K / 2, N] uint8    two 4-bit codes q in [0, 15] per byte (layout below)
    scale   [K / G, N] float    per-group step
    offset  [K / G, N] float    per-group value of code 0 (asymmetric: w ~= q * scale + offset)
Packing layout: within each group, row j of the first half goes to the low nibble and row j of the
second half to the high nibble of the same byte:
    packed[g*G/2 + j, n] = q[g*G + j, n] | q[g*G + G/2 + j, n] << 4      for 0 <= j < G/2
so unpacking a group is two bit operations and no interleave, and the kernel can multiply the low
and high nibbles by two contiguous halves of the activation group.

`int4_matmul(x [M, K] float, packed, scale, offset) -> [M, N] x.dtype`. Per group g the kernel
computes `(x_g @ q_g) * scale[g] + sum(x_g) * offset[g]`: the scale multiplies an [M, N] tile
rather than each weight. Implementations:
    "pallas"     the Triton-style Pallas kernel below (GPU); one K-loop step per group.
    "interpret"  the same kernel in Pallas interpret mode (tests on CPU; slow).
    "xla"        the XLA:CPU formulation chosen by measurement (benchmarks/bench_quant_matmul.py,
                 and whole SmolLM2 decode steps): dequantize in XLA and dot
                 (`xla_cpu.dequantized_dot`), except for a weight too large for its f32 copy to stay
                 in cache at <= 2 activation rows: there the activations split into two int8 levels
                 and one batched int8 x int8 -> int32 dot over the groups runs on the unpacked codes.
    "reference"  dequantize to float32, then an f32 dot at highest precision (the oracle).
    None         "pallas" on GPU, "xla" elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.activation_quant import merge_split_rows, split_per_token_int8
from pallas_kernels.quant_tiling import MIN_BLOCK, accumulate_over_k, dispatch, pallas_supports, tiled_matmul_call
from pallas_kernels.xla_cpu import after_activations, cache_resident_as_f32, dequantized_dot

INT4_LEVELS = 16
# For a weight too large to convert in cache, the split-activation batched int8 dot is the faster
# XLA:CPU formulation up to this many activation rows (see benchmarks/bench_quant_matmul.py).
SPLIT_DOT_MAX_ROWS = 2


def group_size_of(packed: jax.Array, scale: jax.Array) -> int:
    """The group size G of an int4 weight: its K rows divided by its number of groups."""
    return 2 * packed.shape[0] // scale.shape[0]


def pack_int4(q: jax.Array, group_size: int) -> jax.Array:
    """Packs codes `q [K, N]` (integers in [0, 15]) into `[K / 2, N]` uint8 (layout in the module doc)."""
    k, n = q.shape
    halves = q.astype(jnp.uint8).reshape(k // group_size, 2, group_size // 2, n)
    return (halves[:, 0] | (halves[:, 1] << 4)).reshape(k // 2, n)


def unpack_int4(packed: jax.Array, group_size: int) -> jax.Array:
    """Inverse of `pack_int4`: `[K / 2, N]` uint8 -> codes `[K, N]` uint8 in [0, 15]."""
    half_rows, n = packed.shape
    by_group = packed.reshape(-1, group_size // 2, n)
    return jnp.stack([by_group & 0xF, by_group >> 4], axis=1).reshape(2 * half_rows, n)


def codes_by_group(packed: jax.Array, groups: int) -> jax.Array:
    """An int4 weight's codes `[K / G, G, N]` int8 (0..15), for integer dots over each group."""
    group_size = 2 * packed.shape[0] // groups
    # A bitcast, not a convert: codes 0..15 read the same as int8, and XLA:CPU converts are slow.
    codes = lax.bitcast_convert_type(unpack_int4(packed, group_size), jnp.int8)
    return codes.reshape(groups, group_size, packed.shape[1])


def offset_term(x: jax.Array, offset: jax.Array) -> jax.Array:
    """The offsets' share of `x [M, K]` times an int4 weight: `sum(x_g) * offset[g]` over the groups
    -> `[M, N]` float32."""
    m, k = x.shape
    groups = offset.shape[0]
    x_group_sum = x.astype(jnp.float32).reshape(m, groups, k // groups).sum(axis=-1)
    return x_group_sum @ offset.astype(jnp.float32)


def dequantize_int4(packed: jax.Array, scale: jax.Array, offset: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """The `[K, N]` weight of `dtype` that an int4 weight stands for: `q * scale + offset` per group.

    Computed in float32 and rounded once: in bf16 the sum of the two larger terms would lose
    several bits of the (smaller) weight.
    """
    groups, n = scale.shape
    group_size = group_size_of(packed, scale)
    q = unpack_int4(packed, group_size).reshape(groups, group_size, n).astype(jnp.float32)
    w = q * scale.astype(jnp.float32)[:, None, :] + offset.astype(jnp.float32)[:, None, :]
    return w.reshape(groups * group_size, n).astype(dtype)


def _int4_kernel(x_ref, packed_ref, scale_ref, offset_ref, out_ref, *, group_size: int):
    half = group_size // 2

    def step(g, acc):
        x_low = x_ref[:, pl.ds(pl.multiple_of(g * group_size, group_size), half)]
        x_high = x_ref[:, pl.ds(pl.multiple_of(g * group_size + half, half), half)]
        packed = packed_ref[pl.ds(pl.multiple_of(g * half, half), half), :]
        low_codes = (packed & 0xF).astype(x_low.dtype)
        high_codes = (packed >> 4).astype(x_low.dtype)
        code_dot = jnp.dot(x_low, low_codes, preferred_element_type=jnp.float32) + jnp.dot(
            x_high, high_codes, preferred_element_type=jnp.float32
        )
        x_group_sum = jnp.sum(x_low.astype(jnp.float32), axis=1) + jnp.sum(x_high.astype(jnp.float32), axis=1)
        group_scale = scale_ref[g, :].astype(jnp.float32)
        group_offset = offset_ref[g, :].astype(jnp.float32)
        return acc + code_dot * group_scale[None, :] + x_group_sum[:, None] * group_offset[None, :]

    acc = accumulate_over_k(scale_ref.shape[0], step, jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def int4_matmul_pallas(
    x: jax.Array, packed: jax.Array, scale: jax.Array, offset: jax.Array, *, interpret: bool = False
) -> jax.Array:
    kernel = functools.partial(_int4_kernel, group_size=group_size_of(packed, scale))
    return tiled_matmul_call(kernel, [x], [packed, scale, offset], out_dtype=x.dtype, interpret=interpret)


def int4_matmul_reference(x: jax.Array, packed: jax.Array, scale: jax.Array, offset: jax.Array) -> jax.Array:
    w = dequantize_int4(packed, scale, offset, jnp.float32)
    return jnp.dot(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST).astype(x.dtype)


def split_activation_group_dot(x: jax.Array, packed: jax.Array, scale: jax.Array, offset: jax.Array) -> jax.Array:
    m, k = x.shape
    groups = scale.shape[0]
    x_split, split_scale = split_per_token_int8(x)
    acc = lax.dot_general(
        x_split.reshape(2 * m, groups, k // groups),
        codes_by_group(packed, groups),
        dimension_numbers=(((2,), (1,)), ((1,), (0,))),
        preferred_element_type=jnp.int32,
    )
    code_dot = merge_split_rows(acc, split_scale)
    return jnp.einsum("gmn,gn->mn", code_dot, scale.astype(jnp.float32)) + offset_term(x, offset)


def int4_matmul_xla(x: jax.Array, packed: jax.Array, scale: jax.Array, offset: jax.Array) -> jax.Array:
    x_after, (packed, scale, offset) = after_activations(x, packed, scale, offset)
    if x.shape[0] <= SPLIT_DOT_MAX_ROWS and not cache_resident_as_f32(2 * packed.shape[0], packed.shape[1]):
        out = split_activation_group_dot(x_after, packed, scale, offset)
    else:
        out = dequantized_dot(x_after, dequantize_int4(packed, scale, offset, jnp.float32))
    return out.astype(x.dtype)


def int4_matmul(
    x: jax.Array, packed: jax.Array, scale: jax.Array, offset: jax.Array, *, implementation: str | None = None
) -> jax.Array:
    """`x [M, K]` (f32/bf16) times the int4 weight (packed `[K/2, N]`, scale/offset `[K/G, N]`) -> `[M, N]` x.dtype."""
    group_size = group_size_of(packed, scale)
    half = group_size // 2
    run = dispatch(
        implementation,
        tileable=half >= MIN_BLOCK and half == pl.next_power_of_2(half) and pallas_supports(half, packed.shape[1]),
        pallas=int4_matmul_pallas,
        xla=int4_matmul_xla,
        reference=int4_matmul_reference,
    )
    return run(x, packed, scale, offset)
