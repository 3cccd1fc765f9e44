"""Quantized weight pytrees: what `quantize_weight` returns and what the model's `linear` multiplies by.

Each class stands for a logical weight `w [in, out]` (the layout `linear(x [..., in], w) -> [..., out]`
uses) and offers
    matmul(x [..., in] float32/bfloat16, live_rows=None) -> [..., out] in x.dtype
        (through its pallas_kernels module; live_rows, a traced int32 scalar, says how many of x's
        first rows are real: where a CPU kernel runs, W8A8's and W4A8's packed for it, the rows
        after them come back zero uncomputed, elsewhere they are computed as any other)
    dequantize() -> [in, out] float32                                 (the weight it stands for)
    shape -> (in, out)
The classes are registered dataclass pytrees whose fields are all arrays (or None), so they pass
through `jit`, `device_put` and sharding like the plain arrays they replace.

| class        | mode          | fields                                                              |
| ------------ | ------------- | ------------------------------------------------------------------- |
| Int8Weight   | "int8" W8A16  | q [in, out] int8, scale [out] f32                                   |
| Int4Weight   | "int4" W4A16  | packed [in/2, out] uint8, scale [in/G, out] f16, offset [in/G, out] f16 |
| W8A8Weight   | "w8a8", "fp8" | q [in, out] int8 or float8_e4m3fn, scale [out] f32 (fp8 per-tensor: [] f32) |
| W4A8Weight   | "w4a8"        | Int4Weight's fields, G = 32; activations quantized to int8 per group  |
An int8 `q` may be stored packed for the CPU kernel (a `cpu_int8_dot.PackedInt8`: codes
`[out/4, 4, in]` and their sums `[out]`, see pallas_kernels.cpu_int8_dot and
`jaxinfer.quant.apply.pack_for_cpu_kernel`); `shape` and `dequantize` read either layout. So may a
W4A8Weight's three arrays (`packed [out/16, in/8, 16, 4]`, `scale`/`offset [out/16, in/G, 16]`, see
pallas_kernels.cpu_int4_dot).
All carry `input_scale [in] f32 | None`: the weight was quantized as `input_scale[:, None] * w`
(AWQ / SmoothQuant migrate activation range into the weight this way), so `matmul` divides x by it,
unless the division was folded into the op before the weight (`jaxinfer.quant.apply.fold_input_scales`,
which rescales output columns with `scale_outputs(factor [out])`: the same codes, rescaled steps).

Tensor parallelism (mesh axis "model"): every array keeps the weight's `in`/`out` axis positions,
so one PartitionSpec rule per layout covers all fields:
    column-parallel (out sharded): q, packed, 2-D scale/offset P(None, "model"); [out] scales
                                   P("model"); input_scale P(None); a per-tensor [] scale P().
    row-parallel (in sharded):     q, packed, 2-D scale/offset P("model", None); [out] scales P(None);
                                   input_scale P("model"); a per-tensor [] scale P().
Row-parallel int4 needs each shard to hold whole groups (in / tp a multiple of G). In row-parallel
W8A8 the activations' per-token scale is global (GSPMD all-reduces each row's max over the
shards, one [M] all-reduce), so results equal a single device's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import cpu_int4_dot, cpu_int8_dot
from pallas_kernels.int4_matmul import dequantize_int4, int4_matmul
from pallas_kernels.int8_matmul import int8_matmul
from pallas_kernels.w4a8_matmul import w4a8_matmul
from pallas_kernels.w8a8_matmul import w8a8_matmul


class _QuantizedMatmul:
    """`matmul` over any leading dims for a weight class that defines `_matmul_rows(x [M, in], live_rows)`."""

    input_scale: jax.Array | None

    def matmul(self, x: jax.Array, live_rows: jax.Array | None = None) -> jax.Array:
        """`x [..., in]` (float32/bfloat16) times this weight -> `[..., out]` in x.dtype (live_rows: module
        docstring)."""
        in_features, _ = self.shape
        if x.shape[-1] != in_features:
            raise ValueError(
                f"activation has {x.shape[-1]} features but this {type(self).__name__} expects {in_features} "
                f"(shape {self.shape}); check that the weight is stored as [in, out]"
            )
        rows = x.reshape(-1, in_features)
        if self.input_scale is not None:
            rows = (rows / self.input_scale).astype(x.dtype)
        return self._matmul_rows(rows, live_rows).reshape(*x.shape[:-1], -1)

    def _unscale_input(self, w: jax.Array) -> jax.Array:
        return w if self.input_scale is None else w / self.input_scale[:, None]


@dataclasses.dataclass(frozen=True)
class _ScaledWeight(_QuantizedMatmul):
    """An 8-bit `q [in, out]` times a per-output-channel `scale [out]` (or per-tensor `[]`)."""

    q: jax.Array
    scale: jax.Array
    input_scale: jax.Array | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return cpu_int8_dot.logical_shape(self.q)

    def dequantize(self) -> jax.Array:
        return self._unscale_input(cpu_int8_dot.standard_layout(self.q).astype(jnp.float32) * self.scale)

    def scale_outputs(self, factor: jax.Array) -> _ScaledWeight:
        """This weight with output column j multiplied by `factor[j]`: the same codes, rescaled."""
        if self.scale.ndim != 1:
            raise ValueError("a per-tensor scale cannot take a factor per output column")
        return dataclasses.replace(self, scale=(self.scale * factor).astype(self.scale.dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight(_ScaledWeight):
    """Weight-only int8 (W8A16): `w ~= q * scale[None, :]`, activations stay float."""

    def _matmul_rows(self, x: jax.Array, live_rows: jax.Array | None) -> jax.Array:
        return int8_matmul(x, self.q, self.scale)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int4Weight(_QuantizedMatmul):
    """Group-wise int4 (W4A16): `w ~= q * scale + offset` per group of G input rows, q in [0, 15] packed two per byte."""

    packed: jax.Array
    scale: jax.Array
    offset: jax.Array
    input_scale: jax.Array | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return 2 * self.packed.shape[0], self.packed.shape[1]

    @property
    def group_size(self) -> int:
        return self.shape[0] // self.scale.shape[0]

    def _matmul_rows(self, x: jax.Array, live_rows: jax.Array | None) -> jax.Array:
        return int4_matmul(x, self.packed, self.scale, self.offset)

    def dequantize(self) -> jax.Array:
        return self._unscale_input(dequantize_int4(self.packed, self.scale, self.offset, jnp.float32))

    def scale_outputs(self, factor: jax.Array) -> Int4Weight:
        """This weight with output column j multiplied by `factor[j]`: the same codes, each group's
        step and minimum rescaled (`[in/G, out]` layout, before any CPU kernel packing)."""
        if self.scale.ndim != 2:
            raise ValueError("a weight packed for the CPU kernel cannot be rescaled; rescale it before packing")
        return dataclasses.replace(self, scale=(self.scale * factor).astype(self.scale.dtype),
                                   offset=(self.offset * factor).astype(self.offset.dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class W8A8Weight(_ScaledWeight):
    """8-bit weights and per-token dynamically quantized 8-bit activations, int8 or float8_e4m3fn: `w ~= q * scale`."""

    def _matmul_rows(self, x: jax.Array, live_rows: jax.Array | None) -> jax.Array:
        return w8a8_matmul(x, self.q, self.scale, live_rows=live_rows)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class W4A8Weight(Int4Weight):
    """Int4Weight's weights times activations quantized to int8 per group of G (llama.cpp's Q4_1 x
    Q8_1 arithmetic, pallas_kernels.w4a8_matmul); the arrays may be in the CPU kernel's layout."""

    @property
    def shape(self) -> tuple[int, int]:
        return cpu_int4_dot.logical_shape(self.packed)

    @property
    def group_size(self) -> int:
        return self.shape[0] // self.scale.shape[-2]

    def _matmul_rows(self, x: jax.Array, live_rows: jax.Array | None) -> jax.Array:
        return w4a8_matmul(x, self.packed, self.scale, self.offset, live_rows)

    def dequantize(self) -> jax.Array:
        packed, scale, offset = self.packed, self.scale, self.offset
        if cpu_int4_dot.is_packed(packed):
            packed, scale, offset = cpu_int4_dot.unpack(packed, scale, offset)
        return self._unscale_input(dequantize_int4(packed, scale, offset, jnp.float32))


QuantizedWeight = Int8Weight | Int4Weight | W8A8Weight | W4A8Weight
