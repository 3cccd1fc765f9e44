"""Placing params on a device mesh: the ('data', 'model') mesh, logical-axis shardings, and the
head padding that lets any tensor-parallel size divide the attention heads.

The mapping from logical axes (`jaxinfer.model.llama.param_logical_axes`) to mesh axes comes from
configs/sharding.yaml through Flax's logical partitioning. When the KV heads are not a multiple of
the tensor-parallel size (SmolLM2 has 3 KV heads), heads are padded with zero weights: a padded
query head attends to a padded KV head whose values are zero, and its rows of `wo` are zero, so it
adds exactly nothing to the output.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxinfer.configs import logical_axis_rules
from jaxinfer.errors import EngineError
from jaxinfer.model.config import ModelConfig
from jaxinfer.model.llama import param_logical_axes
from jaxinfer.model.panel_weight import panel_logical_axes
from jaxinfer.quant.apply import is_quantized, quantized_logical_axes


def make_mesh(tp: int = 1) -> Mesh:
    devices = jax.devices()
    if tp < 1 or len(devices) < tp:
        raise EngineError(f"tensor parallelism {tp} needs {tp} devices but {len(devices)} are visible "
                          "(on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    return Mesh(np.asarray(devices[:tp]).reshape(1, tp), ("data", "model"))


def logical_sharding(mesh: Mesh, logical_axes: tuple[str | None, ...]) -> NamedSharding:
    return nn.logical_to_mesh_sharding(PartitionSpec(*logical_axes), mesh, logical_axis_rules())


def param_shardings(cfg: ModelConfig, mesh: Mesh, params=None):
    """NamedShardings in the structure of `param_logical_axes`, or of `params` when given: a
    quantized weight (jaxinfer.quant) gets one sharding per field, derived from its layer's axes,
    and a PanelWeight its panels' (jaxinfer.model.panel_weight)."""
    axes = param_logical_axes(cfg)
    if params is not None:
        axes = panel_logical_axes(params, quantized_logical_axes(params, axes))
    return jax.tree.map(lambda leaf_axes: logical_sharding(mesh, leaf_axes), axes,
                        is_leaf=lambda x: isinstance(x, tuple))


def pad_heads(params: dict, cfg: ModelConfig, tp: int) -> tuple[dict, ModelConfig]:
    """Pads qkv/o (and biases) so the head counts divide by `tp`. Works on numpy params."""
    padded = cfg.with_padded_heads(tp)
    if padded == cfg:
        return params, cfg
    extra_q = (padded.num_heads - cfg.num_heads) * cfg.head_dim
    extra_groups = (padded.num_kv_heads - cfg.num_kv_heads) * (cfg.q_per_kv + 2) * cfg.head_dim
    # w_qkv is ordered by KV-head group (jaxinfer.model.llama), so whole zero groups appended at the
    # end keep every real query head with its real KV head.
    pads = {"w_qkv": (1, extra_groups), "b_qkv": (0, extra_groups), "wo": (0, extra_q)}

    def pad(name, array):
        if name not in pads:
            return array
        axis, amount = pads[name]
        widths = [(0, 0)] * array.ndim
        widths[axis] = (0, amount)
        return np.pad(array, widths)

    layers = [{name: pad(name, array) for name, array in layer.items()} for layer in params["layers"]]
    return {**params, "layers": layers}, padded


def place_params(params: dict, cfg: ModelConfig, mesh: Mesh, dtype: str) -> tuple[dict, ModelConfig]:
    """Pads heads for the mesh's tensor-parallel size, casts every float array to `dtype` (quantized
    weights keep their storage dtypes) and puts it on the mesh with its logical sharding."""
    params, cfg = pad_heads(params, cfg, mesh.shape["model"])
    shardings = param_shardings(cfg, mesh, params)

    def place(param, sharding):
        return jax.device_put(param if is_quantized(param) else jnp.asarray(param, dtype=dtype), sharding)

    return jax.tree.map(place, params, shardings, is_leaf=is_quantized), cfg
