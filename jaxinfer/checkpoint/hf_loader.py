"""HF checkpoint directories: config.json, one or many *.safetensors (with the index), tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from jaxinfer.checkpoint.tensor_names import assemble_params
from jaxinfer.errors import CheckpointError
from jaxinfer.model.config import ModelConfig
from jaxinfer.tokenizer import Tokenizer


def read_json(file: Path) -> dict:
    """The JSON object an HF checkpoint file holds; CheckpointError naming the file when it holds
    anything else."""
    try:
        value = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON ({err}); restore it from the model's HF repository") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} holds a JSON {type(value).__name__} where a JSON object belongs; "
                              "restore it from the model's HF repository")
    return value


def read_config(config_file: Path) -> tuple[ModelConfig, dict]:
    """The ModelConfig of an HF config.json (named after its directory), and the raw dict."""
    hf_config = read_json(config_file)
    return ModelConfig.from_hf(hf_config, name=config_file.parent.name), hf_config


def load(directory: Path):
    from jaxinfer.checkpoint import Checkpoint

    cfg, _ = read_config(directory / "config.json")
    files = _safetensors_files(directory)
    where = {}
    handles = {}
    try:
        for file in files:
            # "flax" rather than "numpy": numpy has no bfloat16, a common checkpoint dtype.
            handles[file] = safe_open(str(file), framework="flax")
            for key in handles[file].keys():
                where[key] = file

        def fetch(name: str, ours: str):
            return np.asarray(handles[where[name]].get_tensor(name), dtype=np.float32)

        params = assemble_params(cfg, fetch, set(where), "hf")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read safetensors in {directory}: {err}; the file may be truncated") from None
    tokenizer = Tokenizer.from_hf_dir(directory, cfg.eos_token_ids)
    return Checkpoint(cfg, params, tokenizer, str(directory))


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names; "
                                  "restore the file from the model's HF repository")
        files = sorted({directory / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index.name} names shard(s) {missing} that are not in {directory}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} has no *.safetensors weights (jaxinfer does not read .bin/.pt files)")
    return files
