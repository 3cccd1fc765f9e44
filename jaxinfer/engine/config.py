"""EngineConfig: every build-time choice of an engine, with defaults from configs/engine.yaml.

Frozen and JSON-serializable: it is written into the engine manifest and read back at load.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from jaxinfer.cache.kv_pool import device_kv_budget
from jaxinfer.configs import default_dtype, default_kv_dtype, load_config
from jaxinfer.errors import EngineError
from jaxinfer.quant.apply import QUANT_MODES
from jaxinfer.runner.buckets import BucketLadder

KV_DTYPES = ("float32", "bfloat16", "int8", "fp8")
DTYPES = ("float32", "bfloat16")
_SIZE_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    dtype: str
    kv_dtype: str
    tp: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    kv_memory: str
    min_token_bucket: int
    buckets_per_doubling: int
    decode_steps: int
    decode_call_tokens: int
    quant: str | None = None

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise EngineError(f"dtype {self.dtype!r} is not one of {DTYPES}")
        if self.kv_dtype not in KV_DTYPES:
            raise EngineError(f"kv_dtype {self.kv_dtype!r} is not one of {KV_DTYPES} (or 'auto')")
        if self.quant is not None and self.quant not in QUANT_MODES:
            raise EngineError(f"quant {self.quant!r} is not a quantization mode; valid modes: "
                              f"{', '.join(QUANT_MODES)} (or None for unquantized weights)")
        if not 8 <= self.block_size <= 256 or self.block_size & (self.block_size - 1):
            raise EngineError(f"block_size {self.block_size} must be a power of two between 8 and 256")
        if self.buckets_per_doubling & (self.buckets_per_doubling - 1):
            raise EngineError(f"buckets_per_doubling {self.buckets_per_doubling} must be a power of two (1: buckets "
                              "at powers of two only; 2: their midpoints too)")
        for name in ("tp", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "min_token_bucket",
                     "buckets_per_doubling", "decode_steps", "decode_call_tokens"):
            if getattr(self, name) < 1:
                raise EngineError(f"{name} must be >= 1, got {getattr(self, name)}")
        try:
            self.ladder
        except ValueError as err:
            raise EngineError(str(err)) from None
        self._kv_memory()  # a malformed size fails here, not after the checkpoint is loaded and quantized

    @classmethod
    def create(cls, **overrides: Any) -> EngineConfig:
        """Defaults from configs/engine.yaml, overridden by the non-None keyword arguments."""
        values = dict(load_config("engine"))
        values.update({k: v for k, v in overrides.items() if v is not None})
        values.setdefault("tp", 1)
        if values.get("dtype") in (None, "auto"):
            values["dtype"] = default_dtype(quantized=values.get("quant") is not None)
        if values["kv_dtype"] == "auto":
            values["kv_dtype"] = default_kv_dtype(values["dtype"], quantized=values.get("quant") is not None)
        values["kv_memory"] = str(values["kv_memory"])
        return cls(**values)

    @property
    def ladder(self) -> BucketLadder:
        return BucketLadder(self.max_num_seqs, self.max_num_batched_tokens, self.min_token_bucket,
                            self.buckets_per_doubling)

    @property
    def max_blocks_per_seq(self) -> int:
        return math.ceil(self.max_model_len / self.block_size)

    def kv_budget_bytes(self) -> int:
        """The KV pool budget: `kv_memory` as bytes, or as a fraction of the device's free memory
        (call it once the weights are on the device)."""
        size, fraction = self._kv_memory()
        return device_kv_budget(fraction) if fraction is not None else size

    def _kv_memory(self) -> tuple[int | None, float | None]:
        """`kv_memory` parsed: (bytes, None) for a size, (None, fraction) for a fraction."""
        text = self.kv_memory.strip().lower()
        if re.fullmatch(r"0?\.\d+|1(\.0*)?", text):
            return None, float(text)
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?", text)
        if not match:
            raise EngineError(f"kv_memory={self.kv_memory!r} is neither a size (e.g. 512MiB, 2GiB) nor a fraction (0.9)")
        return int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""]), None
