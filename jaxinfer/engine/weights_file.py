"""An engine's params as one safetensors file, loaded through a memory map.

Every leaf of the params pytree (arrays of any dtype: bfloat16 matmul weights, the int8/uint8
codes, float16/float32 scales and float8 weights of quantized engines) is stored under its pytree
path, `layers.3.w_qkv.packed`, in its serving layout and dtype, so the file is a plain safetensors
file that any safetensors reader lists.

Loading maps the file and hands each tensor to `jax.device_put` with the sharding the caller's
target tree gives. On the CPU, jax then uses the mapped pages themselves, without a copy, for
every tensor whose offset is 64-byte aligned: the writer pads the header to 64 bytes and puts the
tensors whose sizes are multiples of 64 bytes first (every weight matrix; only a few small scales
and norms come after them and are copied), so a 270 MB engine's weights are ready in tens of
milliseconds and processes serving the same engine share one copy in the page cache. The file
must therefore not be rewritten in place while an engine uses it; `jaxinfer build` writes a new
directory beside the old one and replaces it (a running process keeps the old file's pages).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.errors import EngineError

_ALIGNMENT = 64
_DTYPE_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(jnp.bfloat16): "BF16",
                np.dtype(jnp.float8_e4m3fn): "F8_E4M3", np.dtype(jnp.float8_e5m2): "F8_E5M2",
                np.dtype(np.int32): "I32", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8"}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


def leaf_name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator=".")


def save_params(path: Path, params) -> None:
    """Writes every leaf of `params` (gathered to the host) to one safetensors file at `path`."""
    arrays = {leaf_name(key_path): np.asarray(leaf) for key_path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    order = sorted(arrays, key=lambda name: (arrays[name].nbytes % _ALIGNMENT != 0, name))
    header, offset = {}, 0
    for name in order:
        array = arrays[name]
        header[name] = {"dtype": _DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    # safetensors allows trailing spaces in the header: they put the data on a 64-byte boundary.
    encoded += b" " * (-(8 + len(encoded)) % _ALIGNMENT)
    with path.open("wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for name in order:
            f.write(np.ascontiguousarray(arrays[name]).tobytes())


def load_params(path: Path, target):
    """The params stored at `path`, shaped like `target` (a pytree of jax.ShapeDtypeStruct with
    shardings); a missing tensor or one of another shape or dtype is an EngineError."""
    try:
        with path.open("rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            if header_size > path.stat().st_size - 8:
                raise ValueError(f"a header of {header_size} bytes")
            header = json.loads(f.read(header_size))
            if not isinstance(header, dict):
                raise ValueError("a header that is not a JSON object")
        data = np.memmap(path, np.uint8, mode="r", offset=8 + header_size)
    except (OSError, ValueError) as err:
        raise EngineError(f"cannot read the engine weights {path} ({err}); rebuild the engine with "
                          "`jaxinfer build`") from None

    def load(key_path, struct: jax.ShapeDtypeStruct):
        name = leaf_name(key_path)
        entry = header.get(name)
        if entry is None:
            raise EngineError(f"the engine weights {path} have no tensor {name!r}; rebuild the engine with "
                              "`jaxinfer build`")
        dtype, shape = _DTYPES.get(entry["dtype"]), tuple(entry["shape"])
        if dtype != struct.dtype or shape != struct.shape:
            raise EngineError(f"the engine weights {path} store {name!r} as {entry['dtype']} {list(shape)}, "
                              f"this engine needs {struct.dtype} {list(struct.shape)}; rebuild the engine with "
                              "`jaxinfer build`")
        start, end = entry["data_offsets"]
        if end > data.size:
            raise EngineError(f"the engine weights {path} end before tensor {name!r} (truncated?); rebuild the "
                              "engine with `jaxinfer build`")
        return jax.device_put(data[start:end].view(dtype).reshape(shape), struct.sharding)

    return jax.tree_util.tree_map_with_path(load, target)
