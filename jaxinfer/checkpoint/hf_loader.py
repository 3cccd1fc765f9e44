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


def read_config(config_file: Path) -> tuple[ModelConfig, dict]:
    """The ModelConfig of an HF config.json (named after its directory), and the raw dict."""
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file} is not valid JSON: {err}") from None
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
            if name not in where:
                return None
            array = handles[where[name]].get_tensor(name)
            return np.asarray(array, dtype=np.float32)

        params = assemble_params(cfg, fetch, "hf")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read safetensors in {directory}: {err}; the file may be truncated") from None
    tokenizer = Tokenizer.from_hf_dir(directory, cfg.eos_token_ids)
    return Checkpoint(cfg, params, tokenizer, str(directory))


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({directory / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index.name} names shard(s) {missing} that are not in {directory}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} has no *.safetensors weights (jaxinfer does not read .bin/.pt files)")
    return files
