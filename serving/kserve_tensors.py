"""KServe v2 tensors <-> numpy: decoding the inputs of a ModelInferRequest (raw little-endian
buffers or typed `contents`) and encoding BYTES outputs, as tritonclient lays them out.

BYTES elements are numpy object arrays of `bytes`; in raw form each element is a 4-byte
little-endian length followed by its bytes.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from serving.errors import MalformedRequestError

_NUMPY_DTYPES = {"BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
                 "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
                 "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
# datatype -> the typed `contents` field that holds it, and that field's own datatype (narrow
# integers travel in 32-bit fields).
_CONTENTS_FIELDS = {"BOOL": ("bool_contents", "BOOL"), "INT8": ("int_contents", "INT32"),
                    "INT16": ("int_contents", "INT32"), "INT32": ("int_contents", "INT32"),
                    "INT64": ("int64_contents", "INT64"), "UINT8": ("uint_contents", "UINT32"),
                    "UINT16": ("uint_contents", "UINT32"), "UINT32": ("uint_contents", "UINT32"),
                    "UINT64": ("uint64_contents", "UINT64"), "FP32": ("fp32_contents", "FP32"),
                    "FP64": ("fp64_contents", "FP64"), "BYTES": ("bytes_contents", "BYTES")}
# The kind of value each datatype holds: an input may come in any width of its declared kind.
_KINDS = {"BOOL": "BOOL", "BYTES": "BYTES",
          **dict.fromkeys(("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"),
                          "an integer type"),
          **dict.fromkeys(("FP16", "FP32", "FP64"), "a floating-point type")}


def _split_bytes(name: str, raw: bytes) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise MalformedRequestError(f"input {name!r}: truncated BYTES element length at offset {offset}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise MalformedRequestError(f"input {name!r}: BYTES element of {length} bytes overruns the buffer")
        elements.append(raw[offset:offset + length])
        offset += length
    return elements


def check_datatype(tensor, declared: str) -> None:
    """Refuses a tensor whose datatype is of another kind than `declared` (INT64 for INT32 is fine;
    FP32 for INT32 is not: 2.7 tokens has no meaning, and NaN no integer value)."""
    kind = _KINDS[declared]
    if _KINDS.get(tensor.datatype) != kind:
        raise MalformedRequestError(f"input {tensor.name!r} is {tensor.datatype}, not {kind}; send it as {declared}")


def decode_tensor(tensor, raw: bytes | None) -> np.ndarray:
    """One InferInputTensor as a numpy array of its declared shape."""
    name, datatype, shape = tensor.name, tensor.datatype, tuple(tensor.shape)
    if datatype not in _CONTENTS_FIELDS and datatype not in _NUMPY_DTYPES:
        raise MalformedRequestError(f"input {name!r}: unsupported datatype {datatype!r}")
    if any(d < 0 for d in shape):
        raise MalformedRequestError(f"input {name!r}: negative dimension in shape {list(shape)}")
    if datatype == "BYTES":
        values = _split_bytes(name, raw) if raw is not None else list(tensor.contents.bytes_contents)
        array = np.empty(len(values), dtype=object)
        array[:] = values
    elif raw is not None:
        dtype = np.dtype(_NUMPY_DTYPES[datatype]).newbyteorder("<")
        if len(raw) % dtype.itemsize:
            raise MalformedRequestError(f"input {name!r}: {len(raw)} raw bytes is not a whole number of {datatype}")
        array = np.frombuffer(raw, dtype=dtype)
    elif datatype in _CONTENTS_FIELDS:
        field, field_datatype = _CONTENTS_FIELDS[datatype]
        values = np.asarray(getattr(tensor.contents, field), dtype=_NUMPY_DTYPES[field_datatype])
        array = values.astype(_NUMPY_DTYPES[datatype])
        # A narrow integer would wrap around silently (300 of an INT8 tensor to 44).
        if field_datatype != datatype and (array != values).any():
            raise MalformedRequestError(f"input {name!r}: a value of its contents is out of the range of {datatype}")
    else:
        raise MalformedRequestError(f"input {name!r}: {datatype} tensors must be sent as raw contents")
    if array.size != math.prod(shape):
        raise MalformedRequestError(f"input {name!r}: {array.size} elements do not fill shape {list(shape)}")
    try:
        return array.reshape(shape)
    except ValueError:  # numpy refuses a shape too big to address, even one of no elements
        raise MalformedRequestError(f"input {name!r}: shape {list(shape)} is too big") from None


def decode_inputs(request) -> dict[str, np.ndarray]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise MalformedRequestError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; "
                                    "send one raw buffer per input or none")
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in inputs:
            raise MalformedRequestError(f"input {tensor.name!r} is given twice")
        inputs[tensor.name] = decode_tensor(tensor, raw[i] if raw else None)
    return inputs


def encode_bytes(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)
