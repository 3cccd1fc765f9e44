"""Random weights for a model shape (`--model random:CONFIG`): speed measurements with no checkpoint.

CONFIG is an HF config.json, or a directory holding one (configs/models/ has the shapes the
benchmarks use). Every linear weight is drawn from N(0, initializer_range) (HF's own init, 0.02 by
default), norm scales are 1, biases 0. The draws run on the default device, one jitted call per
tensor: a Llama-3-8B shape costs no host memory and no host-to-device copy. The params are float32
jax arrays in the layout of `jaxinfer.model.llama`, like a loaded checkpoint's numpy arrays.

The tokenizer is the directory's tokenizer.json when it has one; otherwise a byte-level vocabulary of
256 tokens, which is all a benchmark of random token ids needs (ids beyond it decode to nothing).
Generated text is noise: these weights serve timing and memory figures, never quality.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from jaxinfer.checkpoint import hf_loader
from jaxinfer.errors import CheckpointError
from jaxinfer.model.config import ModelConfig
from jaxinfer.model.llama import param_shapes
from jaxinfer.tokenizer import Tokenizer

PREFIX = "random:"


def is_random_spec(model) -> bool:
    """Whether `model` (a CLI/API model argument) asks for random weights."""
    return isinstance(model, str) and model.startswith(PREFIX)


def read_config(spec: str) -> tuple[ModelConfig, dict, Path]:
    """The ModelConfig of `random:CONFIG` (no weights drawn), with the HF config dict and its file."""
    path = Path(spec.removeprefix(PREFIX))
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise CheckpointError(f"{spec!r}: random weights need an HF config.json (the file or its directory), "
                              f"e.g. random:configs/models/llama3-8b")
    return (*hf_loader.read_config(config_file), config_file)


def load(spec: str):
    from jaxinfer.checkpoint import Checkpoint

    cfg, hf_config, config_file = read_config(spec)
    std = float(hf_config.get("initializer_range", 0.02))
    shapes = param_shapes(cfg)
    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(shapes, is_leaf=_is_shape))))
    params = jax.tree_util.tree_map_with_path(lambda where, shape: _draw(where[-1].key, shape, next(keys), std),
                                              shapes, is_leaf=_is_shape)
    tokenizer_file = config_file.parent / "tokenizer.json"
    tokenizer = (Tokenizer.from_hf_dir(config_file.parent, cfg.eos_token_ids) if tokenizer_file.is_file()
                 else _byte_tokenizer(cfg.eos_token_ids))
    return Checkpoint(cfg, params, tokenizer, spec)


def _is_shape(node) -> bool:
    return isinstance(node, tuple)


def _draw(name: str, shape: tuple[int, ...], key: jax.Array, std: float) -> jax.Array:
    if name.endswith("norm"):
        return _constant(shape, 1.0)
    if name.startswith("b_"):
        return _constant(shape, 0.0)
    return _normal(key, shape, std)


@functools.partial(jax.jit, static_argnums=(1,))
def _normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
    return std * jax.random.normal(key, shape, jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _constant(shape: tuple[int, ...], value: float) -> jax.Array:
    return jnp.full(shape, value, jnp.float32)


def _byte_tokenizer(eos_token_ids: tuple[int, ...]) -> Tokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = tokenizers.Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend, eos_token_ids)
