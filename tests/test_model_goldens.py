"""The JAX model against HF transformers goldens (tests/goldens, written by scripts/make_goldens.py).

Tiny random-init checkpoints of every supported architecture: f32 logits within 1e-4 relative
(norm of difference over norm of reference) and 32 greedy tokens identical.
"""

import json

import numpy as np
import pytest
import safetensors.numpy

from conftest import CHECKPOINTS_DIR, GOLDENS_DIR
from jaxinfer.checkpoint import load_checkpoint
from jaxinfer.errors import CheckpointError
from jaxinfer.model.sharding import make_mesh, place_params
from jaxinfer.reference import ReferenceGenerator

TINY_CHECKPOINTS = ["tiny-llama2", "tiny-llama3", "tiny-mistral", "tiny-qwen2", "tiny-smollm2"]


def relative_error(actual, expected):
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def prompts_of(golden):
    return sorted({key.split("_")[1] for key in golden.files if key.startswith("prompt_")})


@pytest.mark.parametrize("name", TINY_CHECKPOINTS)
def test_tiny_checkpoint_matches_transformers(name):
    golden = np.load(GOLDENS_DIR / f"{name}.npz")
    header = json.loads((GOLDENS_DIR / f"{name}.json").read_text())
    ck = load_checkpoint(CHECKPOINTS_DIR / name)
    assert ck.config.architecture == header["architecture"]
    params, cfg = place_params(ck.params, ck.config, make_mesh(1), "float32")
    generator = ReferenceGenerator(params, cfg, max_len=64)
    for p in prompts_of(golden):
        prompt = golden[f"prompt_{p}_ids"].tolist()
        logits = generator.prompt_logits([prompt])[0]
        assert relative_error(logits, golden[f"prompt_{p}_logits"]) < 1e-4
        greedy = generator.generate([prompt], 32)[0]
        assert greedy == golden[f"prompt_{p}_greedy_ids"].tolist()


def test_bfloat16_logits_within_bfloat16_precision():
    golden = np.load(GOLDENS_DIR / "tiny-llama3.npz")
    ck = load_checkpoint(CHECKPOINTS_DIR / "tiny-llama3")
    generator = ReferenceGenerator(*place_params(ck.params, ck.config, make_mesh(1), "bfloat16"), max_len=64)
    prompt = golden["prompt_2_ids"].tolist()
    assert relative_error(generator.prompt_logits([prompt])[0], golden["prompt_2_logits"]) < 3e-2


@pytest.mark.parametrize("tensor, change, message", [
    ("model.layers.1.self_attn.k_proj.weight", "shrink",
     r"layers\.1\.wk has shape \(\d+, \d+\) but the config implies"),
    ("model.layers.0.mlp.up_proj.weight", "drop", r"lacks tensor\(s\) layers\.0\.\['w_up'\]"),
])
def test_checkpoint_whose_tensors_contradict_its_config_names_the_tensor(tmp_path, tensor, change, message):
    source = CHECKPOINTS_DIR / "tiny-llama3"
    for file in source.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    tensors = safetensors.numpy.load_file(source / "model.safetensors")
    if change == "drop":
        del tensors[tensor]
    else:
        tensors[tensor] = tensors[tensor][:-1]
    safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path)
