"""Loading real checkpoints (HF safetensors directories, GGUF files) into the model's param layout.

`load_checkpoint(path)` returns a `Checkpoint`: the ModelConfig, the params as float32 numpy
arrays in the layout of `jaxinfer.model.llama` (`[in, out]`; jax arrays on the default device for
`random:CONFIG`, random weights of a config's shape), and the Tokenizer. Casting to the
engine dtype and placing on devices is the caller's (see `jaxinfer.model.sharding`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxinfer.checkpoint.default_model import default_model_path
from jaxinfer.errors import CheckpointError
from jaxinfer.model.config import ModelConfig
from jaxinfer.model.llama import param_shapes
from jaxinfer.tokenizer import Tokenizer


@dataclasses.dataclass
class Checkpoint:
    config: ModelConfig
    params: dict
    tokenizer: Tokenizer
    source: str


def load_checkpoint(path: str | Path | None = None) -> Checkpoint:
    """Loads an HF checkpoint directory or a GGUF file; None loads the default model;
    "random:CONFIG" draws random weights for an HF config's shape (jaxinfer.checkpoint.random_weights)."""
    from jaxinfer.checkpoint import gguf_loader, hf_loader, random_weights

    if random_weights.is_random_spec(path):
        return random_weights.load(path)
    path = Path(path) if path is not None else default_model_path()
    if not path.exists():
        raise CheckpointError(f"model path {path} does not exist; pass an HF checkpoint directory or a .gguf file")
    if path.is_file() and path.suffix == ".gguf":
        checkpoint = gguf_loader.load(path)
    elif path.is_dir() and (path / "config.json").is_file():
        checkpoint = hf_loader.load(path)
    else:
        raise CheckpointError(
            f"{path} is neither a .gguf file nor a directory with config.json (an HF checkpoint)")
    check_params_match_config(checkpoint.params, checkpoint.config)
    return checkpoint


def load_config(path: str | Path | None = None) -> ModelConfig:
    """The model config alone: for random:CONFIG without drawing the weights (an 8B shape would take
    32 GB), else that of the loaded checkpoint."""
    from jaxinfer.checkpoint import random_weights

    if random_weights.is_random_spec(path):
        return random_weights.read_config(path)[0]
    return load_checkpoint(path).config


def check_params_match_config(params: dict, cfg: ModelConfig) -> None:
    """Raises CheckpointError naming the first tensor whose shape contradicts the config."""
    check_shapes(param_shapes(cfg), params)


def check_shapes(expected, params, where: str = "") -> None:
    """Raises CheckpointError naming the first tensor of `params` that is missing from, or shaped
    otherwise than, `expected` (the same pytree of shape tuples); `where` prefixes the names."""
    if isinstance(expected, dict):
        missing = sorted(set(expected) - set(params))
        if missing:
            raise CheckpointError(f"checkpoint lacks tensor(s) {where}{missing}")
        for key in expected:
            check_shapes(expected[key], params[key], f"{where}{key}.")
    elif isinstance(expected, list):
        if len(params) != len(expected):
            raise CheckpointError(f"config says {len(expected)} layers but the checkpoint has {len(params)}")
        for i, (e, g) in enumerate(zip(expected, params)):
            check_shapes(e, g, f"{where}{i}.")
    elif tuple(np.shape(params)) != expected:
        raise CheckpointError(
            f"tensor {where.rstrip('.')} has shape {tuple(np.shape(params))} but the config implies {expected}; "
            "the config and the weights do not belong together")
