"""Loads the YAML defaults under `configs/` (the one place for dtypes, bucket ladders, sharding
rules and engine defaults) into plain Python values."""

from __future__ import annotations

import functools
from typing import Any

import jax
import yaml

from jaxinfer.package_data import data_dir

CONFIG_DIR = data_dir("config_files")


@functools.cache
def load_config(name: str) -> dict[str, Any]:
    """Reads `configs/<name>.yaml`."""
    return yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())


def default_dtype(backend: str | None = None, quantized: bool = False) -> str:
    """The engine dtype for a backend ("cpu", "gpu", "tpu"; the default backend when None), for an
    engine with quantized weights or without."""
    return load_config("defaults")["quantized_dtype" if quantized else "dtype"][backend or jax.default_backend()]


def default_kv_dtype(dtype: str, quantized: bool, backend: str | None = None) -> str:
    """What `kv_dtype: auto` stores K/V as: the engine's dtype, or for an engine with quantized
    weights the backend's quantized_kv_dtype."""
    return load_config("defaults")["quantized_kv_dtype"][backend or jax.default_backend()] if quantized else dtype


def logical_axis_rules() -> tuple[tuple[str, str | None], ...]:
    return tuple(load_config("sharding")["logical_axis_rules"].items())
