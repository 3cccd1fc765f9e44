"""Quantized weights: `quantize_weight(w [in, out], mode, **options)` and the weight pytrees it returns.

Each weight has `matmul(x [..., in]) -> [..., out]` (the model's `linear` calls it for anything
that is not a plain array) and `dequantize() -> [in, out] float32`. Modes: "int8" (W8A16), "int4"
(group-wise W4A16), "w8a8" (int8 weights and activations), "fp8" (float8_e4m3fn weights and
activations), "w4a8" (int4 weights, activations int8 per group of 32). Layouts and tensor-parallel sharding: `jaxinfer.quant.weights`.
"""

from jaxinfer.quant.quantize import MODES, default_group_size, quantize_weight
from jaxinfer.quant.weights import Int4Weight, Int8Weight, QuantizedWeight, W4A8Weight, W8A8Weight

__all__ = [
    "MODES",
    "Int4Weight",
    "Int8Weight",
    "QuantizedWeight",
    "W4A8Weight",
    "W8A8Weight",
    "default_group_size",
    "quantize_weight",
]
