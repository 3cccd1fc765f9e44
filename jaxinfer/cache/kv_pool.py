"""The paged KV pool on the device: per-layer cache arrays, cache writes, quantization, memory planning.

Engine-facing API (one `LayerKVCache` per layer; the model holds a list of them):

    LayerKVCache.k, .v          [num_blocks, block_size, num_kv_heads, head_dim]  storage dtype
    LayerKVCache.k_scale, .v_scale
                                [num_blocks, block_size, num_kv_heads] float32 for "int8"/"fp8"
                                storage (one scale per token and kv head), None otherwise.

    Flat slot `block * block_size + offset` addresses one token's row; physical block 0 is the null
    block (see `jaxinfer.cache.attention_metadata`). The kv_heads axis is the one tensor parallelism
    shards.

    init_layer_cache(num_blocks, block_size, num_kv_heads, head_dim, kv_dtype) -> LayerKVCache
    write_kv(cache, k [T, kvh, hd], v [T, kvh, hd], slot_mapping [T] int32) -> LayerKVCache
        Scatters the step's new K/V into their slots, quantizing when the storage is int8/fp8. Call it
        inside the jitted step and donate the pool there: XLA then updates the buffers in place.
    as_stored(x [..., hd], kv_dtype) -> x as attention reads it back from such a pool
    plan_kv_memory(num_layers, num_kv_heads, head_dim, kv_dtype, block_size, budget_bytes)
        -> KVMemoryPlan (num_blocks, max_concurrent_tokens, bytes_per_token, describe()).
    device_kv_budget(fraction, device=None) -> int bytes, where the backend reports its memory (GPU);
        an EngineError on CPU, which reports none: give the budget in bytes there.

kv_dtype names: "float32", "bfloat16" (stored as is), "int8", "fp8" (float8_e4m3fn, per-token-per-head
absmax scales, dequantized inside the attention kernels by `dequantize_kv`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinfer.errors import EngineError

STORAGE_DTYPES = {
    "float32": jnp.dtype(jnp.float32),
    "bfloat16": jnp.dtype(jnp.bfloat16),
    "int8": jnp.dtype(jnp.int8),
    "fp8": jnp.dtype(jnp.float8_e4m3fn),
}
# The largest magnitude each quantized storage dtype holds; a row's absmax is scaled onto it.
_QUANTIZED_RANGE = {jnp.dtype(jnp.int8): 127.0, jnp.dtype(jnp.float8_e4m3fn): 448.0}
_SCALE_BYTES = jnp.dtype(jnp.float32).itemsize


def storage_dtype(kv_dtype: str) -> jnp.dtype:
    """The array dtype of the pool for a kv_dtype name; an EngineError names the choices."""
    if kv_dtype not in STORAGE_DTYPES:
        raise EngineError(f"unknown KV cache dtype {kv_dtype!r}: choose one of {', '.join(STORAGE_DTYPES)} "
                          f"(--kv-dtype)")
    return STORAGE_DTYPES[kv_dtype]


def is_quantized_dtype(dtype: jnp.dtype) -> bool:
    """Whether a pool stored in `dtype` carries per-token-per-head scales."""
    return jnp.dtype(dtype) in _QUANTIZED_RANGE


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerKVCache:
    """One layer's K/V pool (shapes in the module docstring); a pytree, so it passes through jit."""

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    @property
    def num_blocks(self) -> int:
        return self.k.shape[0]

    @property
    def block_size(self) -> int:
        return self.k.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None


def init_layer_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                     kv_dtype: str) -> LayerKVCache:
    """A zero-filled pool for one layer (block 0 included: it is the null block)."""
    dtype = storage_dtype(kv_dtype)
    if num_blocks < 2 or block_size < 1:
        raise EngineError(f"a KV pool needs at least 2 blocks (block 0 is the null block) of at least 1 token; "
                          f"got num_blocks={num_blocks}, block_size={block_size}")
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    if not is_quantized_dtype(dtype):
        return LayerKVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
    return LayerKVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                        k_scale=jnp.zeros(shape[:3], jnp.float32), v_scale=jnp.zeros(shape[:3], jnp.float32))


def quantize_kv(x: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """x [..., head_dim] float -> (values [..., head_dim] in `dtype`, scales [...] float32).

    Symmetric absmax scaling per row (one row = one token of one kv head); an all-zero row gets scale 1.
    """
    limit = _QUANTIZED_RANGE[jnp.dtype(dtype)]
    x = x.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(absmax > 0, absmax / limit, 1.0)
    scaled = jnp.clip(x / scale[..., None], -limit, limit)
    if jnp.issubdtype(dtype, jnp.integer):
        scaled = jnp.round(scaled)
    return scaled.astype(dtype), scale


def dequantize_kv(values: jax.Array, scale: jax.Array | None) -> jax.Array:
    """values [..., head_dim] (any storage dtype), scale [...] or None -> float32 [..., head_dim]."""
    values = values.astype(jnp.float32)
    if scale is None:
        return values
    return values * scale[..., None]


def as_stored(x: jax.Array, kv_dtype: str) -> jax.Array:
    """x [..., head_dim] as attention reads it back from a pool of `kv_dtype`: rounded to the
    storage dtype (int8/fp8: scaled per row, as `write_kv` stores it), in x's dtype. For models
    that attend over a contiguous cache (jaxinfer.eval) to see the pool's rounding."""
    dtype = storage_dtype(kv_dtype)
    if is_quantized_dtype(dtype):
        return dequantize_kv(*quantize_kv(x, dtype)).astype(x.dtype)
    return x.astype(dtype).astype(x.dtype)


def write_kv(cache: LayerKVCache, k: jax.Array, v: jax.Array, slot_mapping: jax.Array) -> LayerKVCache:
    """Scatter k, v [T, num_kv_heads, head_dim] into flat slots slot_mapping [T] (int32).

    Padding tokens carry slots inside the null block, so several may hit one slot; which one wins
    does not matter because the null block is never read under a valid mask.
    """
    expected = (slot_mapping.shape[0], cache.num_kv_heads, cache.head_dim)
    if k.shape != expected or v.shape != expected:
        raise ValueError(f"write_kv: k {k.shape} and v {v.shape} must both be [T, num_kv_heads, head_dim] = "
                         f"{expected} to match slot_mapping {slot_mapping.shape} and the pool {cache.k.shape}")
    blocks, offsets = slot_mapping // cache.block_size, slot_mapping % cache.block_size

    def scatter(pool: jax.Array, rows: jax.Array) -> jax.Array:
        # Indexing (block, offset) rather than a reshaped flat view: XLA:CPU then updates the
        # donated pool in place; through the reshape it copied the whole pool every step.
        return pool.at[blocks, offsets].set(rows)

    if not cache.quantized:
        return LayerKVCache(k=scatter(cache.k, k.astype(cache.k.dtype)), v=scatter(cache.v, v.astype(cache.v.dtype)))
    k_values, k_scale = quantize_kv(k, cache.k.dtype)
    v_values, v_scale = quantize_kv(v, cache.v.dtype)
    return LayerKVCache(k=scatter(cache.k, k_values), v=scatter(cache.v, v_values),
                        k_scale=scatter(cache.k_scale, k_scale), v_scale=scatter(cache.v_scale, v_scale))


@dataclasses.dataclass(frozen=True)
class KVMemoryPlan:
    """How many pool blocks a memory budget buys, with the arithmetic behind it."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_dtype: str
    block_size: int
    budget_bytes: int
    num_blocks: int

    @property
    def value_bytes(self) -> int:
        return STORAGE_DTYPES[self.kv_dtype].itemsize

    @property
    def scale_bytes_per_token(self) -> int:
        quantized = is_quantized_dtype(STORAGE_DTYPES[self.kv_dtype])
        return 2 * self.num_layers * self.num_kv_heads * _SCALE_BYTES if quantized else 0

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token in every layer, scales included."""
        values = 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.value_bytes
        return values + self.scale_bytes_per_token

    @property
    def pool_bytes(self) -> int:
        return self.num_blocks * self.block_size * self.bytes_per_token

    @property
    def max_concurrent_tokens(self) -> int:
        """Tokens the usable blocks hold (the null block holds none)."""
        return (self.num_blocks - 1) * self.block_size

    def describe(self) -> str:
        value_part = (f"2 x {self.num_layers} layers x {self.num_kv_heads} kv_heads x {self.head_dim} head_dim"
                      f" x {self.value_bytes} B ({self.kv_dtype})")
        if self.scale_bytes_per_token:
            value_part += f" + 2 x {self.num_layers} x {self.num_kv_heads} x {_SCALE_BYTES} B scales"
        return "\n".join([
            f"KV cache per token: {value_part} = {self.bytes_per_token:,} B",
            f"KV cache per block: {self.block_size} tokens x {self.bytes_per_token:,} B = "
            f"{self.block_size * self.bytes_per_token:,} B",
            f"KV cache budget {self.budget_bytes:,} B -> {self.num_blocks:,} blocks "
            f"({self.pool_bytes:,} B; block 0 is the null block) -> "
            f"{self.max_concurrent_tokens:,} max concurrent tokens",
        ])


def plan_kv_memory(num_layers: int, num_kv_heads: int, head_dim: int, kv_dtype: str, block_size: int,
                   budget_bytes: int) -> KVMemoryPlan:
    """The largest pool that fits budget_bytes; an EngineError when not even two blocks fit."""
    storage_dtype(kv_dtype)
    if min(num_layers, num_kv_heads, head_dim, block_size) < 1:
        raise EngineError(f"plan_kv_memory: layers ({num_layers}), kv heads ({num_kv_heads}), head_dim "
                          f"({head_dim}) and block_size ({block_size}) must all be >= 1")
    empty_plan = KVMemoryPlan(num_layers, num_kv_heads, head_dim, kv_dtype, block_size, int(budget_bytes),
                              num_blocks=0)
    block_bytes = block_size * empty_plan.bytes_per_token
    num_blocks = int(budget_bytes) // block_bytes
    if num_blocks < 2:
        raise EngineError(f"a KV cache budget of {int(budget_bytes):,} B holds {num_blocks} blocks of "
                          f"{block_bytes:,} B; at least 2 are needed (block 0 is the null block): "
                          f"raise the budget, or use a smaller --kv-dtype or block size")
    return dataclasses.replace(empty_plan, num_blocks=num_blocks)


def device_kv_budget(fraction: float, device: jax.Device | None = None) -> int:
    """Bytes for the KV pool: `fraction` of the device's memory limit minus what is already in use.

    Call it after the weights are on the device so that they count as in use. Backends that report
    no memory statistics (CPU) get an EngineError asking for the budget in bytes.
    """
    if not 0 < fraction <= 1:
        raise EngineError(f"the KV cache memory fraction must be in (0, 1]; got {fraction}")
    device = device if device is not None else jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        raise EngineError(f"the {device.platform} backend does not report its memory size, so a fraction of it "
                          f"cannot be computed: give the KV cache budget in bytes instead")
    budget = int(fraction * stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    if budget <= 0:
        raise EngineError(f"{fraction:.0%} of the device memory ({stats['bytes_limit']:,} B) leaves nothing for the "
                          f"KV cache: {stats.get('bytes_in_use', 0):,} B are already in use; raise the fraction")
    return budget
