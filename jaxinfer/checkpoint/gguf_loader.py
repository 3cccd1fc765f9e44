"""GGUF files (llama.cpp's format): metadata, dequantization, and undoing llama.cpp's Q/K row order.

Tensors are dequantized to float32 with the `gguf` package. llama.cpp's converter permutes the rows
of Q and K for the `llama` architecture (interleaved RoPE pairs); we restore HF's half-split order,
so the same RoPE code serves both formats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from jaxinfer.checkpoint.tensor_names import LM_HEAD, assemble_params
from jaxinfer.errors import CheckpointError
from jaxinfer.model.config import ModelConfig, RopeScaling
from jaxinfer.tokenizer import Tokenizer

SUPPORTED_TENSOR_TYPES = {GGMLQuantizationType[name] for name in
                          ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")}
# GGUF architecture name -> (HF architecture, whether Q/K rows are permuted, attention bias)
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", True, False),
    "mistral": ("MistralForCausalLM", True, False),
    "qwen2": ("Qwen2ForCausalLM", False, True),
}


def load(path: Path):
    from jaxinfer.checkpoint import Checkpoint

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as err:
        raise CheckpointError(f"{path} is not a readable GGUF file ({err}); it may be truncated or corrupt") from None
    meta = {name: _field_value(field) for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    cfg = _config(meta, path, set(tensors))
    permuted = _ARCHITECTURES[meta["general.architecture"]][1]

    def fetch(name: str, ours: str):
        tensor = tensors[name]
        if tensor.tensor_type not in SUPPORTED_TENSOR_TYPES:
            raise CheckpointError(
                f"{path.name}: tensor {name} has type {tensor.tensor_type.name}, which jaxinfer cannot dequantize; "
                f"supported: {sorted(t.name for t in SUPPORTED_TENSOR_TYPES)}")
        array = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        # GGUF lists dims fastest-first; numpy's row-major shape is the reverse.
        array = array.reshape(tuple(int(d) for d in reversed(tensor.shape)))
        if permuted and ours in ("wq", "bq"):
            array = _unpermute_rows(array, cfg.num_heads)
        elif permuted and ours in ("wk", "bk"):
            array = _unpermute_rows(array, cfg.num_kv_heads)
        return array

    try:
        params = assemble_params(cfg, fetch, set(tensors), "gguf")
    except (ValueError, IndexError) as err:
        raise CheckpointError(f"{path}: tensor data is inconsistent ({err}); the file may be truncated") from None
    return Checkpoint(cfg, params, Tokenizer.from_gguf_metadata(meta), str(path))


def _unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: rows [heads, half, 2] -> HF's [heads, 2, half]."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _config(meta: dict[str, Any], path: Path, tensor_names: set[str]) -> ModelConfig:
    """The ModelConfig of a GGUF file's metadata and tensor names; CheckpointError for what the
    model cannot run as the file means it."""
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise CheckpointError(f"{path.name}: GGUF architecture {arch!r} is not supported; "
                              f"jaxinfer runs {sorted(_ARCHITECTURES)}")
    hf_arch, _, bias = _ARCHITECTURES[arch]

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"{path.name}: GGUF metadata lacks {arch}.{key}")
        return value

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    tokens = meta.get("tokenizer.ggml.tokens") or []
    scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type not in ("none", "linear"):
        raise CheckpointError(f"{path.name}: GGUF RoPE scaling type {scaling_type!r} is not supported (only "
                              "'linear'); use the model's HF checkpoint directory")
    # llama.cpp stores Llama 3.1's `llama3` scaling as per-frequency factors, not as the parameters
    # RopeScaling takes; running without them would be a different model at every position.
    if "rope_freqs.weight" in tensor_names:
        raise CheckpointError(f"{path.name} carries RoPE frequency factors (rope_freqs.weight, Llama 3.1-style "
                              "scaling), which jaxinfer does not read from GGUF; "
                              "use the model's HF checkpoint directory")
    scaling = RopeScaling("linear", float(get("rope.scaling.factor"))) if scaling_type == "linear" else None
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=hf_arch,
        vocab_size=int(meta.get(f"{arch}.vocab_size") or len(tokens)),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length") or hidden // heads),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("context_length")),
        tie_word_embeddings=LM_HEAD.gguf not in tensor_names,
        attention_bias=bias,
        rope_scaling=scaling,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        name=str(meta.get("general.name") or path.stem),
    )


def _field_value(field) -> Any:
    """A GGUF metadata field as a Python value (written against the reader's raw parts, which are
    stable across gguf package versions)."""
    kind = field.types[0]
    if kind == GGUFValueType.ARRAY:
        item = field.types[-1]
        if item == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if kind == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    return field.parts[field.data[0]].tolist()[0]
