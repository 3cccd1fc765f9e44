"""The one table from checkpoint tensor names (HF and GGUF) to our parameter names.

Both formats store linear weights as `[out, in]` and embeddings as `[vocab, hidden]`; our params
are `[in, out]` and `[hidden, vocab]`, so those are transposed on load (`transpose=True`). The
names here are the checkpoints' separate projections; `assemble_params` then fuses q/k/v and
gate/up into the model's layout (jaxinfer.model.llama).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxinfer.checkpoint import check_shapes
from jaxinfer.errors import CheckpointError
from jaxinfer.model.config import ModelConfig
from jaxinfer.model.llama import fuse_projections


@dataclasses.dataclass(frozen=True)
class TensorName:
    ours: str
    hf: str
    gguf: str
    transpose: bool = False


LM_HEAD = TensorName("lm_head", "lm_head.weight", "output.weight", transpose=True)
GLOBAL_TENSORS = (
    TensorName("embed", "model.embed_tokens.weight", "token_embd.weight", transpose=True),
    TensorName("final_norm", "model.norm.weight", "output_norm.weight"),
    LM_HEAD,
)

# Per layer: HF names are prefixed `model.layers.{i}.`, GGUF names `blk.{i}.`.
LAYER_TENSORS = (
    TensorName("attn_norm", "input_layernorm.weight", "attn_norm.weight"),
    TensorName("wq", "self_attn.q_proj.weight", "attn_q.weight", transpose=True),
    TensorName("wk", "self_attn.k_proj.weight", "attn_k.weight", transpose=True),
    TensorName("wv", "self_attn.v_proj.weight", "attn_v.weight", transpose=True),
    TensorName("bq", "self_attn.q_proj.bias", "attn_q.bias"),
    TensorName("bk", "self_attn.k_proj.bias", "attn_k.bias"),
    TensorName("bv", "self_attn.v_proj.bias", "attn_v.bias"),
    TensorName("wo", "self_attn.o_proj.weight", "attn_output.weight", transpose=True),
    TensorName("mlp_norm", "post_attention_layernorm.weight", "ffn_norm.weight"),
    TensorName("w_gate", "mlp.gate_proj.weight", "ffn_gate.weight", transpose=True),
    TensorName("w_up", "mlp.up_proj.weight", "ffn_up.weight", transpose=True),
    TensorName("w_down", "mlp.down_proj.weight", "ffn_down.weight", transpose=True),
)

_BIASES = ("bq", "bk", "bv")
# Tensors some checkpoints carry that the model does without: HF's older checkpoints store RoPE's
# inverse frequencies, which the model computes from the config.
_HARMLESS_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_layer_name(i: int, name: TensorName) -> str:
    return f"model.layers.{i}.{name.hf}"


def gguf_layer_name(i: int, name: TensorName) -> str:
    return f"blk.{i}.{name.gguf}"


def assemble_params(cfg: ModelConfig, fetch, present: set[str], checkpoint_format: str) -> dict:
    """Builds the param pytree from the checkpoint's tensor names `present` and `fetch(checkpoint_name,
    our_name) -> np.ndarray`, with each layer's projections fused the way the model uses them.

    Raises CheckpointError for a tensor the config gives the model no use for (extra layers, biases
    the config does not enable, an untied head in a tied model): running without it would be a
    different model than the checkpoint's."""
    def name_of(name: TensorName, layer: int | None) -> str:
        if checkpoint_format == "hf":
            return name.hf if layer is None else hf_layer_name(layer, name)
        return name.gguf if layer is None else gguf_layer_name(layer, name)

    layer_tensors = tuple(name for name in LAYER_TENSORS if cfg.attention_bias or name.ours not in _BIASES)
    wanted = {name_of(name, None) for name in GLOBAL_TENSORS} | {
        name_of(name, i) for i in range(cfg.num_layers) for name in layer_tensors}
    unused = sorted(name for name in present - wanted if not name.endswith(_HARMLESS_SUFFIXES))
    if unused:
        raise CheckpointError(
            f"the checkpoint has {len(unused)} tensor(s) the config gives the model no use for: {unused[:6]}"
            f"{' ...' if len(unused) > 6 else ''}; the config (num_hidden_layers, attention_bias, ...) does not "
            "describe these weights: fix config.json, or check that the config and the weights belong together")

    def collect(names, layer):
        out = {}
        for name in names:
            checkpoint_name = name_of(name, layer)
            if checkpoint_name in present:
                array = fetch(checkpoint_name, name.ours)
                out[name.ours] = array.T if name.transpose else array
        return out

    params = collect(GLOBAL_TENSORS, None)
    head = params.pop("lm_head", None) if cfg.tie_word_embeddings else None
    # A tied model reads its head from the embedding table; a stored copy of it is redundant.
    if head is not None and "embed" in params and not np.array_equal(head, params["embed"]):
        raise CheckpointError(
            f"the config ties the output head to the embeddings (tie_word_embeddings) but the checkpoint's "
            f"{name_of(LM_HEAD, None)} differs from the embedding table; set tie_word_embeddings "
            "to false if the model has a separate head")
    params["layers"] = [_fused_layer(collect(layer_tensors, i), cfg, i) for i in range(cfg.num_layers)]
    return params


def _fused_layer(layer: dict, cfg: ModelConfig, index: int) -> dict:
    """`fuse_projections`, after checking the tensors it packs (a CheckpointError names a missing
    or misshapen one)."""
    h, hd = cfg.hidden_size, cfg.head_dim
    expected = {"wq": (h, cfg.num_heads * hd), "wk": (h, cfg.num_kv_heads * hd), "wv": (h, cfg.num_kv_heads * hd),
                "w_gate": (h, cfg.intermediate_size), "w_up": (h, cfg.intermediate_size)}
    if cfg.attention_bias:
        expected |= {"bq": expected["wq"][1:], "bk": expected["wk"][1:], "bv": expected["wv"][1:]}
    check_shapes(expected, layer, f"layers.{index}.")
    return fuse_projections(layer, cfg)
