"""Bfloat16 weights stored as the CPU dense kernel's AMX panels: the layout a one-device bfloat16
engine keeps on a CPU with AMX-BF16, whose kernel would otherwise pack every weight into AMX tiles
again at every call (pallas_kernels.cpu_dense_dot `pack_panels`).

    PanelWeight(panels [N/32, K/32, 2, 16, 16, 2] bf16) stands for a weight w [K, N]:
        matmul(x [..., K]) -> [..., N] in x's dtype   XLA's dot over the unpacked weight, x in its
                                                      dtype (the model outside engine steps; a
                                                      step routes the panels to the kernel,
                                                      jaxinfer.runner.step)
        columns(ids [...] int) -> [..., K]            columns of w: the token lookup of a tied
                                                      embedding table [hidden, vocab]
        shape (K, N), dtype
    uses_panel_weights(dtype, quant, tp) -> bool      whether an engine stores them
    has_panel_weights(params) -> bool                 whether these params hold any
    pack_panel_weights(params) -> params              every layer matmul weight and the head (for
                                                      tied embeddings the table itself, which the
                                                      lookup then reads through `columns`) as
                                                      PanelWeight, in any dtype (numpy params are
                                                      packed as views before they are cast and
                                                      placed); traceable (jax.eval_shape gives an
                                                      engine's restore structure)
    panel_logical_axes(params, axes) -> axes          a PanelWeight's (out, in, None...) axes

No weight is kept twice: the panels are the only copy, so the engine's memory stays the checkpoint's.
Why: the packing took about half of the AMX loop's time. Against the same kernel on the `[K, N]`
weight (packing at every call; at 1-2 rows its FMA loop), the default model's weights streaming from
memory (benchmarks/bench_dense_dot.py, Xeon VM, 2026-12-06, medians of 9), speed-ups of 0.9-1.3x at
1-2 rows, 1.05-1.2x at 4, 1.3-2.0x at 8, 1.3-2.3x at 16,
1.05-1.4x at 64, 1.1-1.4x at 256; the 576 x 49152 head at 8 / 16 rows in 3.1 / 2.6 ms against
6.3 / 5.8.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinfer.model.layers import linear_in_weight_dtype
from jaxinfer.model.llama import LINEAR_WEIGHTS
from pallas_kernels import cpu_dense_dot


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PanelWeight:
    """A weight `[K, N]` stored as its AMX panels (module docstring): bfloat16 in an engine, float32
    numpy views of a checkpoint's arrays between packing and placing."""

    panels: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        return cpu_dense_dot.weight_shape(self.panels)

    @property
    def dtype(self):
        return self.panels.dtype

    def matmul(self, x: jax.Array) -> jax.Array:
        """x taken in the weight's dtype, float32 sums, returned in x's dtype: as an engine step's
        kernel (jaxinfer.runner.step.KernelDenseWeight), and as the model's plain head takes its
        bfloat16 hidden states."""
        return linear_in_weight_dtype(x, cpu_dense_dot.unpack_panels(self.panels))

    def columns(self, ids: jax.Array) -> jax.Array:
        """Columns `ids` of the weight as rows `[..., K]`, ids clipped into range (as `jnp.take`'s
        mode="clip"): column c lies in panel c // 32, half (c % 32) // 16, at c % 16 of every tile row."""
        ids = jnp.clip(ids, 0, self.shape[1] - 1)
        picked = self.panels[ids // cpu_dense_dot.PANEL_COLS, :, (ids % cpu_dense_dot.PANEL_COLS) // 16, :, ids % 16, :]
        return picked.reshape(*ids.shape, self.shape[0])


def uses_panel_weights(dtype: str, quant: str | None, tp: int) -> bool:
    """Whether an engine stores its matmul weights as panels: bfloat16, unquantized, one device (the
    kernel is not partitioned across a mesh), on a CPU whose dense kernel runs AMX-BF16."""
    return (dtype == "bfloat16" and quant is None and tp == 1 and cpu_dense_dot.AMX_BF16
            and cpu_dense_dot.available())


def has_panel_weights(params) -> bool:
    return any(isinstance(leaf, PanelWeight)
               for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, PanelWeight)))


def _pack(w):
    return PanelWeight(cpu_dense_dot.pack_panels(w)) if cpu_dense_dot.packs_panels(w) else w


def pack_panel_weights(params):
    """`params` with every layer matmul weight and the head as PanelWeight where their shapes allow
    it (module docstring)."""
    layers = [{name: _pack(w) if name in LINEAR_WEIGHTS else w for name, w in layer.items()}
              for layer in params["layers"]]
    head = "lm_head" if "lm_head" in params else "embed"
    return {**params, "layers": layers, head: _pack(params[head])}


def panel_logical_axes(params, axes):
    """`axes` (from `param_logical_axes`) with each PanelWeight's `(in, out)` axes as its panels'
    `(out, in, None, None, None, None)`."""
    def expand(param, param_axes):
        if not isinstance(param, PanelWeight):
            return param_axes
        in_axis, out_axis = param_axes
        return PanelWeight((out_axis, in_axis) + (None,) * 4)

    # Every weight is a leaf here, quantized ones (pytrees of their own) included.
    return jax.tree.map(expand, params, axes, is_leaf=lambda x: not isinstance(x, (dict, list)))
