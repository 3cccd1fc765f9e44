"""The engine weights file (jaxinfer.engine.weights_file): a params pytree of every serving dtype
round-trips bit for bit, sharded or not, as a standard safetensors file whose tensors jax maps
without copying; a file that does not match the engine is refused by name."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from safetensors import safe_open

from jaxinfer.engine.weights_file import load_params, save_params
from jaxinfer.errors import EngineError
from jaxinfer.model.sharding import make_mesh
from jaxinfer.quant.weights import W4A8Weight


def _params(rng):
    def random(shape, dtype):
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            return jnp.asarray(rng.integers(info.min, info.max, shape, endpoint=True, dtype=dtype))
        return jnp.asarray(rng.standard_normal(shape).astype(np.float32).astype(dtype))

    layer = {"attn_norm": random((24,), np.float32),  # 96 bytes: not a multiple of 64
             "w_qkv": random((24, 48), jnp.bfloat16),
             "w_down": W4A8Weight(packed=random((16, 48), np.uint8), scale=random((1, 48), np.float16),
                                  offset=random((1, 48), np.float16)),
             "wo": random((32, 24), jnp.float8_e4m3fn)}
    return {"embed": random((24, 64), np.float32), "head_scale": random((), np.float32),
            "codes": random((5, 7), np.int8), "positions": random((6,), np.int32),
            "layers": [jax.tree.map(lambda x: x + 1 if x.dtype == jnp.float32 else x, layer), layer]}


def _target(params, sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding(x)), params)


def _assert_identical(loaded, params):
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got).reshape(-1).view(np.uint8),
                                      np.asarray(want).reshape(-1).view(np.uint8))


def _mapped_file(address: int) -> str | None:
    """The file mapped at `address` in this process (Linux), None for anonymous memory."""
    for line in open("/proc/self/maps"):
        fields = line.split(maxsplit=5)
        start, end = (int(bound, 16) for bound in fields[0].split("-"))
        if start <= address < end:
            return fields[5].strip() if len(fields) == 6 else None
    return None


def test_params_round_trip_bit_for_bit_through_the_memory_map(rng, tmp_path):
    params = _params(rng)
    path = tmp_path / "weights.safetensors"
    save_params(path, params)
    single = NamedSharding(make_mesh(1), PartitionSpec())
    loaded = load_params(path, _target(params, lambda x: single))
    _assert_identical(loaded, params)

    header_size = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + header_size])
    assert (8 + header_size) % 64 == 0
    for name, entry in header.items():
        start, end = entry["data_offsets"]
        if (end - start) % 64 == 0:  # every such tensor comes first, on a 64-byte boundary
            assert start % 64 == 0, name
    # jax uses the mapped pages of an aligned tensor rather than a copy (the weights file's mapping).
    assert _mapped_file(loaded["layers"][1]["w_qkv"].unsafe_buffer_pointer()) == str(path)
    assert _mapped_file(loaded["layers"][0]["w_down"].packed.unsafe_buffer_pointer()) == str(path)

    # A standard safetensors file: its reader finds every leaf by its pytree path.
    with safe_open(str(path), framework="flax") as f:
        assert set(f.keys()) == set(header)
        np.testing.assert_array_equal(f.get_tensor("layers.0.w_qkv"), params["layers"][0]["w_qkv"])
        np.testing.assert_array_equal(f.get_tensor("layers.1.w_down.scale"), params["layers"][1]["w_down"].scale)


def test_params_load_sharded_over_a_mesh(rng, tmp_path):
    params = _params(rng)
    path = tmp_path / "weights.safetensors"
    save_params(path, params)
    mesh = make_mesh(4)

    def sharding(x):
        split = x.ndim == 2 and x.shape[1] % 4 == 0
        return NamedSharding(mesh, PartitionSpec(None, "model") if split else PartitionSpec())

    loaded = load_params(path, _target(params, sharding))
    _assert_identical(loaded, params)
    assert loaded["layers"][0]["w_qkv"].sharding == sharding(params["layers"][0]["w_qkv"])
    assert len(loaded["layers"][0]["w_qkv"].addressable_shards) == 4


def test_a_file_that_does_not_match_the_engine_is_refused_by_name(rng, tmp_path):
    params = _params(rng)
    path = tmp_path / "weights.safetensors"
    save_params(path, params)
    single = NamedSharding(make_mesh(1), PartitionSpec())

    wider = {**params, "codes": jnp.zeros((5, 8), jnp.int8)}
    with pytest.raises(EngineError, match=r"'codes' as I8 \[5, 7\], this engine needs int8 \[5, 8\].*jaxinfer build"):
        load_params(path, _target(wider, lambda x: single))
    other_dtype = {**params, "embed": params["embed"].astype(jnp.bfloat16)}
    with pytest.raises(EngineError, match="'embed' as F32 .* needs bfloat16"):
        load_params(path, _target(other_dtype, lambda x: single))
    more = {**params, "lm_head": params["embed"]}
    with pytest.raises(EngineError, match="no tensor 'lm_head'"):
        load_params(path, _target(more, lambda x: single))

    whole = path.read_bytes()
    path.write_bytes(whole[:-100])
    with pytest.raises(EngineError, match="the engine weights .* end before tensor .*jaxinfer build"):
        load_params(path, _target(params, lambda x: single))
    for garbage in (b"\xff" * 16, whole[:8] + b"[1, 2]" + whole[14:]):
        path.write_bytes(garbage)
        with pytest.raises(EngineError, match="cannot read the engine weights .*jaxinfer build"):
            load_params(path, _target(params, lambda x: single))
