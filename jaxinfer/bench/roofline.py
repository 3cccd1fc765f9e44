"""The roofline calculator, from first principles: bytes moved and FLOPs done by one model step.

Pure integer/float arithmetic on a ModelConfig. Conventions:
- Weight bytes: every parameter is read once per step at the weight width (a tied embedding table
  once, as the output projection; an untied one counted in full, though its input lookup reads
  only a few columns, and quantized weights without their scales: `bench latency` counts an
  engine's weights exactly as stored).
- KV bytes per token: 2 (K and V) x layers x kv_heads x head_dim x bytes per element.
- FLOPs: 2 per multiply-add. A token passes through every layer matmul; attention costs
  2 x 2 x layers x heads x head_dim per (query, key) pair (QK^T and PV). Logits are computed
  for one position per sequence (the last prompt token in prefill), as serving engines do.
- A step's predicted time is the larger of FLOPs / matmul rate and bytes / memory bandwidth;
  the bandwidth is a copy bandwidth (bytes read + written per second), the figure that bounds
  streaming weights.
"""

from __future__ import annotations

import dataclasses

from jaxinfer.model.config import ModelConfig

# Decode batch sizes whose steps the report predicts side by side (`decode_sweep`, and the points of
# `jaxinfer roofline --plot`): from weight-streaming batch 1 to where the step turns compute-bound.
SWEEP_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# Bytes per weight, by dtype and by quantization mode (`jaxinfer build --quant`).
BYTES_PER_ELEMENT = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "fp8": 1, "int4": 0.5,
                     "int4-awq": 0.5, "w8a8": 1, "w4a8": 0.5}


def weight_bytes(cfg: ModelConfig, bytes_per_param: float) -> float:
    return cfg.num_params * bytes_per_param


def kv_bytes_per_token(cfg: ModelConfig, bytes_per_element: float) -> float:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * bytes_per_element


def layer_matmul_params(cfg: ModelConfig) -> int:
    """Parameters of every layer's projections (q, k, v, o, gate, up, down), summed over layers."""
    attn = cfg.hidden_size * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    return cfg.num_layers * (attn + mlp)


def attention_flops(cfg: ModelConfig, num_pairs: int) -> int:
    """FLOPs of QK^T and PV for `num_pairs` (query, key) pairs."""
    return 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * num_pairs


def decode_flops_per_token(cfg: ModelConfig, context_len: int) -> int:
    """FLOPs to generate one token attending to `context_len` positions (itself included)."""
    return 2 * layer_matmul_params(cfg) + 2 * cfg.vocab_size * cfg.hidden_size + attention_flops(cfg, context_len)


def prefill_flops(cfg: ModelConfig, prompt_len: int) -> int:
    """FLOPs to prefill a `prompt_len`-token prompt (causal attention) and sample its first token."""
    causal_pairs = prompt_len * (prompt_len + 1) // 2
    return (2 * layer_matmul_params(cfg) * prompt_len + 2 * cfg.vocab_size * cfg.hidden_size
            + attention_flops(cfg, causal_pairs))


@dataclasses.dataclass(frozen=True)
class StepEstimate:
    """One step's work, its arithmetic intensity and its predicted time on a device."""

    flops: float
    bytes: float
    compute_time_s: float
    memory_time_s: float

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes

    @property
    def time_s(self) -> float:
        return max(self.compute_time_s, self.memory_time_s)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_time_s > self.memory_time_s else "bandwidth"

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "intensity_flops_per_byte": self.intensity,
                "predicted_time_s": self.time_s, "bound": self.bound}


@dataclasses.dataclass(frozen=True)
class Device:
    bandwidth_bytes_per_s: float
    flops_per_s: float

    def estimate(self, flops: float, num_bytes: float) -> StepEstimate:
        return StepEstimate(flops, num_bytes, flops / self.flops_per_s, num_bytes / self.bandwidth_bytes_per_s)


def decode_step(cfg: ModelConfig, device: Device, batch: int, context_len: int,
                weight_bytes_per_param: float, kv_bytes_per_element: float) -> StepEstimate:
    """A decode step of `batch` sequences at `context_len`: weights read once, each sequence's
    KV read, one new KV entry per sequence written."""
    kv = kv_bytes_per_token(cfg, kv_bytes_per_element)
    num_bytes = weight_bytes(cfg, weight_bytes_per_param) + batch * (context_len + 1) * kv
    return device.estimate(batch * decode_flops_per_token(cfg, context_len + 1), num_bytes)


def prefill_step(cfg: ModelConfig, device: Device, batch: int, prompt_len: int,
                 weight_bytes_per_param: float, kv_bytes_per_element: float) -> StepEstimate:
    """Prefilling `batch` prompts of `prompt_len` tokens in one step: weights read once, every
    prompt token's KV written."""
    kv = kv_bytes_per_token(cfg, kv_bytes_per_element)
    num_bytes = weight_bytes(cfg, weight_bytes_per_param) + batch * prompt_len * kv
    return device.estimate(batch * prefill_flops(cfg, prompt_len), num_bytes)


def roofline_report(cfg: ModelConfig, device: Device, batch: int, context_len: int,
                    dtype: str, kv_dtype: str) -> dict:
    """Everything `jaxinfer roofline` prints, as a JSON-ready dict."""
    w, kv = BYTES_PER_ELEMENT[dtype], BYTES_PER_ELEMENT[kv_dtype]
    decode = decode_step(cfg, device, batch, context_len, w, kv)
    prefill = prefill_step(cfg, device, batch, context_len, w, kv)
    sweep = {b: decode_step(cfg, device, b, context_len, w, kv) for b in SWEEP_BATCHES}
    return {
        "model": {"name": cfg.name, "num_params": cfg.num_params, "num_layers": cfg.num_layers,
                  "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim},
        "dtype": dtype, "kv_dtype": kv_dtype, "batch": batch, "context_len": context_len,
        "device": dataclasses.asdict(device),
        "weight_bytes": weight_bytes(cfg, w),
        "kv_bytes_per_token": kv_bytes_per_token(cfg, kv),
        "decode_flops_per_token": decode_flops_per_token(cfg, context_len + 1),
        "prefill_flops_per_token": prefill_flops(cfg, context_len) / context_len,
        "decode_step": decode.as_dict(),
        "decode_tokens_per_s": batch / decode.time_s,
        "prefill_step": prefill.as_dict(),
        "prefill_tokens_per_s": batch * context_len / prefill.time_s,
        "batch1_decode_bandwidth_bound_tokens_per_s": device.bandwidth_bytes_per_s / weight_bytes(cfg, w),
        "decode_sweep": [{"batch": b, **step.as_dict(), "tokens_per_s": b / step.time_s} for b, step in sweep.items()],
    }
