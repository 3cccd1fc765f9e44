"""Random weights (`random:CONFIG`, jaxinfer.checkpoint.random_weights): the shapes and draws a config
implies, the tokenizer fallback, clear errors, and an engine on them against the reference generator."""

import json

import jax
import numpy as np
import pytest

from conftest import CHECKPOINTS_DIR
from jaxinfer.checkpoint import load_checkpoint
from jaxinfer.errors import CheckpointError
from jaxinfer.model.llama import param_shapes
from jaxinfer.reference import ReferenceGenerator
from jaxinfer.sampling_params import SamplingParams

TINY = CHECKPOINTS_DIR / "tiny-llama3"


def test_params_have_the_config_shapes_and_the_config_init():
    checkpoint = load_checkpoint(f"random:{TINY}")
    std = json.loads((TINY / "config.json").read_text())["initializer_range"]
    shapes = jax.tree.map(lambda a: tuple(a.shape), checkpoint.params)
    assert shapes == jax.tree.map(tuple, param_shapes(checkpoint.config), is_leaf=lambda x: isinstance(x, tuple))
    layer = checkpoint.params["layers"][1]
    np.testing.assert_array_equal(layer["attn_norm"], 1.0)
    for name in ("w_qkv", "wo", "w_gate_up", "w_down"):
        assert abs(float(np.std(layer[name])) / std - 1) < 0.1, name
    # every tensor has its own draw
    assert not np.array_equal(layer["w_qkv"][:, :64], checkpoint.params["layers"][0]["w_qkv"][:, :64])
    assert checkpoint.tokenizer.vocab_size == 512  # the directory's tokenizer.json
    assert checkpoint.source == f"random:{TINY}"


def test_a_config_file_alone_gets_a_byte_tokenizer():
    checkpoint = load_checkpoint("random:configs/models/smollm2-135m/config.json")
    assert checkpoint.config.num_layers == 30 and checkpoint.config.vocab_size == 49152
    assert checkpoint.tokenizer.vocab_size == 256
    assert checkpoint.tokenizer.decode([40000, 45000]) == ""  # ids past the byte vocabulary decode to nothing


def test_missing_config_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="random weights need an HF config.json"):
        load_checkpoint(f"random:{tmp_path}")


def test_engine_on_random_weights_matches_the_reference_generator():
    from jaxinfer.llm import LLM

    llm = LLM(f"random:{TINY}", progress=False, dtype="float32", max_num_seqs=2, max_num_batched_tokens=32,
              max_model_len=128, kv_memory="2MiB")
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 512, 20).tolist() for _ in range(2)]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    checkpoint = load_checkpoint(f"random:{TINY}")  # the same draws: the key is fixed
    expected = ReferenceGenerator(checkpoint.params, checkpoint.config, max_len=64).generate(prompts, 8)
    assert [o.outputs[0].token_ids for o in outputs] == expected


def test_the_config_alone_draws_no_weights():
    from jaxinfer.checkpoint import load_config

    # An 8B shape's float32 draws would take 32 GB: the roofline command only needs the config.
    cfg = load_config("random:configs/models/llama3-8b")
    assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.num_kv_heads) == (32, 4096, 128256, 8)
