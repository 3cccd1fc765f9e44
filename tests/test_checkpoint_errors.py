"""Checkpoint loaders on bad input: a CheckpointError naming the problem, never a traceback or a model
that silently differs from the checkpoint's. Each case is a small variant of tiny-llama3 made in
tmp_path (an HF directory, or a GGUF file written from its tensors)."""

import json
import shutil

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import CHECKPOINTS_DIR
from jaxinfer.checkpoint import load_checkpoint
from jaxinfer.checkpoint.tensor_names import GLOBAL_TENSORS, LAYER_TENSORS, gguf_layer_name, hf_layer_name
from jaxinfer.errors import CheckpointError
from jaxinfer.model.llama import param_shapes

SOURCE = CHECKPOINTS_DIR / "tiny-llama3"
LAYERS = 2
BIAS_SIZES = {"q": 64, "k": 32, "v": 32}  # 4 query and 2 KV heads of 16


def hf_variant(tmp_path, config=None, tensors=None, files=None):
    """A copy of tiny-llama3 with `config` merged into config.json, `tensors(dict)` editing the
    weights in place, and `files` ({name: text}) overwriting files."""
    directory = tmp_path / "model"
    shutil.copytree(SOURCE, directory)
    if config:
        path = directory / "config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | config))
    if tensors:
        weights = load_file(directory / "model.safetensors")
        tensors(weights)
        save_file(weights, directory / "model.safetensors")
    for name, text in (files or {}).items():
        (directory / name).write_text(text)
    return directory


def gguf_variant(tmp_path, metadata=None, extra_tensors=None, merges=("t1 t2",)):
    """tiny-llama3's tensors as a `llama` GGUF file, with extra string/float `metadata` and
    `extra_tensors`; `merges` None leaves the tokenizer's merges out."""
    weights = load_file(SOURCE / "model.safetensors")
    names = {name.hf: name.gguf for name in GLOBAL_TENSORS}
    names |= {hf_layer_name(i, name): gguf_layer_name(i, name) for i in range(LAYERS) for name in LAYER_TENSORS}
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_feed_forward_length(160)
    writer.add_block_count(LAYERS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_context_length(256)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(511)] + ["t1t2"])
    if merges is not None:
        writer.add_token_merges(list(merges))
    for key, value in (metadata or {}).items():
        (writer.add_string if isinstance(value, str) else writer.add_float32)(key, value)
    for name, array in weights.items():
        writer.add_tensor(names[name], array)
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_qkv_biases(weights):
    for i in range(LAYERS):
        for proj, size in BIAS_SIZES.items():
            weights[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = np.ones(size, np.float32)


def test_gguf_variant_loads(tmp_path):
    """The baseline the GGUF cases vary: it loads, without RoPE scaling."""
    checkpoint = load_checkpoint(gguf_variant(tmp_path))
    assert checkpoint.config.rope_scaling is None and len(checkpoint.params["layers"]) == LAYERS


@pytest.mark.parametrize("variant, match", [
    (dict(metadata={"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}), "'yarn'"),
    (dict(extra_tensors={"rope_freqs.weight": np.linspace(1, 8, 8, dtype=np.float32)}), "rope_freqs.weight"),
    (dict(extra_tensors={"blk.2.attn_norm.weight": np.ones(64, np.float32)}), "blk.2.attn_norm.weight"),
    (dict(merges=None), "tokenizer.ggml.merges"),
], ids=["yarn_scaling", "llama3_rope_freqs", "extra_layer", "no_merges"])
def test_gguf_refuses(tmp_path, variant, match):
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(gguf_variant(tmp_path, **variant))


@pytest.mark.parametrize("variant, match", [
    (dict(config={"num_hidden_layers": 1}), r"model\.layers\.1\."),
    (dict(tensors=add_qkv_biases), r"q_proj\.bias"),
    (dict(config={"mlp_bias": True}), "mlp_bias"),
    (dict(config={"hidden_act": "gelu"}), "hidden_act"),
    (dict(config={"sliding_window": 64}), "sliding_window"),
    (dict(config={"tie_word_embeddings": True}), "tie_word_embeddings"),
    (dict(files={"model.safetensors.index.json": "{"}), "model.safetensors.index.json"),
    (dict(files={"config.json": "[]"}), "config.json"),
    (dict(config={"num_attention_heads": None}), "num_attention_heads"),
    (dict(config={"num_key_value_heads": "2"}), "num_key_value_heads"),
    (dict(files={"tokenizer_config.json": "{"}), "tokenizer_config.json"),
], ids=["extra_layer", "unused_biases", "mlp_bias", "hidden_act", "sliding_window", "tied_distinct_head",
        "bad_index", "config_not_object", "heads_null", "kv_heads_string", "bad_tokenizer_config"])
def test_hf_refuses(tmp_path, variant, match):
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(hf_variant(tmp_path, **variant))


def set_head_to_embeddings(weights):
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)


def test_hf_drops_redundant_tensors(tmp_path):
    """A tied model's stored copy of the embedding table and RoPE's stored inverse frequencies load
    and are dropped: the param pytree is the tied model's."""
    checkpoint = load_checkpoint(hf_variant(tmp_path, config={"tie_word_embeddings": True},
                                            tensors=set_head_to_embeddings))
    assert "lm_head" not in checkpoint.params
    assert set(checkpoint.params) == set(param_shapes(checkpoint.config))


def test_qwen2_unused_sliding_window_loads(tmp_path):
    """Qwen2 configs name a window they do not use (use_sliding_window false)."""
    directory = hf_variant(tmp_path, config={"sliding_window": 64, "use_sliding_window": False})
    assert load_checkpoint(directory).config.max_position_embeddings == 256
