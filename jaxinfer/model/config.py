"""ModelConfig: the architecture hyper-parameters of a Llama-family model, from any checkpoint format.

One frozen dataclass describes Llama 2, Llama 3/3.1 (`llama3` RoPE scaling), Mistral, Qwen2/2.5
(q/k/v bias) and SmolLM2 (tied embeddings). Loaders fill it from an HF `config.json` or from GGUF
metadata; `jaxinfer.checkpoint.check_params_match_config` checks it against the tensors actually present.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxinfer.errors import CheckpointError

# HF `architectures` entries we can run, and the attention-bias default each implies.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "Qwen2ForCausalLM": True,
}
SUPPORTED_ROPE_SCALING = ("linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `kind` "linear" divides positions by `factor`; "llama3" rescales
    low frequencies (Llama 3.1), with the remaining fields as in HF's config."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads="
                f"{self.num_kv_heads}; the checkpoint config is inconsistent")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def num_params(self) -> int:
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + 2 * self.hidden_size) + embed + self.hidden_size

    def with_padded_heads(self, multiple: int) -> ModelConfig:
        """The config with KV heads padded up to a multiple of `multiple` (the tensor-parallel size),
        keeping `q_per_kv`; padded heads carry zero weights and contribute exactly nothing."""
        kv = math.ceil(self.num_kv_heads / multiple) * multiple
        return dataclasses.replace(self, num_kv_heads=kv, num_heads=kv * self.q_per_kv)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str = "") -> ModelConfig:
        """From the dict of an HF `config.json`; CheckpointError naming a field that is missing, of
        the wrong type, or asks for what the model does not implement."""
        archs = hf.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"unsupported architecture {arch!r}; jaxinfer runs {sorted(SUPPORTED_ARCHITECTURES)}")
        num_heads = _positive(hf, "num_attention_heads", int)
        hidden = _positive(hf, "hidden_size", int)
        max_positions = _positive(hf, "max_position_embeddings", int, 4096)
        _refuse_unimplemented(hf, max_positions)
        rope_params = _object(hf, "rope_parameters")
        rope_scaling = _object(hf, "rope_scaling") or (
            rope_params if rope_params.get("rope_type", "default") != "default" else {})
        eos = hf.get("eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=_positive(hf, "vocab_size", int),
            hidden_size=hidden,
            intermediate_size=_positive(hf, "intermediate_size", int),
            num_layers=_positive(hf, "num_hidden_layers", int),
            num_heads=num_heads,
            num_kv_heads=_positive(hf, "num_key_value_heads", int, num_heads),
            head_dim=_positive(hf, "head_dim", int, hidden // num_heads),
            rms_norm_eps=_positive(hf, "rms_norm_eps", float, 1e-6),
            rope_theta=_positive(hf, "rope_theta", float, _positive(rope_params, "rope_theta", float, 10000.0)),
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", SUPPORTED_ARCHITECTURES[arch])),
            rope_scaling=_rope_scaling(rope_scaling),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
            name=name,
        )


_REQUIRED = object()


def _positive(hf: dict[str, Any], key: str, kind: type, default: Any = _REQUIRED) -> Any:
    """The positive number `hf[key]` as `kind` (int or float); null counts as absent, giving
    `default`. CheckpointError when a required field is absent or a field holds another value."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise CheckpointError(f"config.json lacks the required field {key!r}")
        return default
    # bool is an int subclass in Python, but `true` is no size.
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or value <= 0 or (kind is int and not float(value).is_integer()):
        raise CheckpointError(f"config.json field {key!r} is {value!r}; it must be a positive "
                              f"{'integer' if kind is int else 'number'}")
    return kind(value)


def _object(hf: dict[str, Any], key: str) -> dict[str, Any]:
    """The JSON object `hf[key]` ({} when absent or null); CheckpointError for another value."""
    value = hf.get(key) or {}
    if not isinstance(value, dict):
        raise CheckpointError(f"config.json field {key!r} is {value!r}; it must be a JSON object")
    return value


def _refuse_unimplemented(hf: dict[str, Any], max_positions: int) -> None:
    """CheckpointError for a config.json field whose model differs from the one jaxinfer runs: the
    weights would load and generate, but not what the checkpoint's model generates."""
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):  # HF's names for the same function
        raise CheckpointError(f"config.json hidden_act is {act!r}; jaxinfer's MLP implements only 'silu'")
    if hf.get("mlp_bias"):
        raise CheckpointError("config.json sets mlp_bias, but jaxinfer's MLP has no biases")
    # Qwen2 configs name a window they do not use (use_sliding_window false).
    if hf.get("use_sliding_window", True):
        window = _positive(hf, "sliding_window", int, max_positions)
        if window < max_positions:
            raise CheckpointError(
                f"config.json sliding_window={window} is below max_position_embeddings={max_positions}; "
                "jaxinfer attends to the full context and does not implement sliding-window attention")


def _rope_scaling(scaling: dict[str, Any]) -> RopeScaling | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind == "default":
        return None
    if kind not in SUPPORTED_ROPE_SCALING:
        raise CheckpointError(
            f"unsupported rope_scaling type {kind!r}; jaxinfer supports {SUPPORTED_ROPE_SCALING}")
    fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"kind"}
    return RopeScaling(kind=kind, **{k: v for k, v in scaling.items() if k in fields})
