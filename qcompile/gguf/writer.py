"""A GGUF v3 writer: metadata with explicit value types, tensors as raw bytes (the layout of :mod:`.reader`).

``write(path, metadata, tensors, alignment=32)``: ``metadata`` is a list of ``(key, type_id, value)`` (arrays:
``type_id`` is ``(ARRAY, item_type)``), ``tensors`` a list of ``(name, ggml type id, ne, data)`` with ``ne`` in ggml
order and ``data`` the tensor's bytes (``uint8`` tensor of ``rows * row_bytes``). Tensor data are laid out in the
given order, each at a multiple of ``alignment``.
"""

from __future__ import annotations

import os
import struct

import numpy as np
import torch

from qcompile.gguf.reader import MAGIC, TENSOR_TYPES, VALUE_TYPES

UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)


def _string(value: str) -> bytes:
    raw = value.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value(type_id, value) -> bytes:
    if isinstance(type_id, tuple):
        _, item = type_id
        header = struct.pack("<IQ", item, len(value))
        if item == STRING:
            return header + b"".join(_string(v) for v in value)
        fmt = VALUE_TYPES[item][1]
        dtype = np.dtype(fmt.replace("?", "b1"))
        return header + np.asarray(value, dtype=dtype).tobytes()
    if type_id == STRING:
        return _string(value)
    return struct.pack(VALUE_TYPES[type_id][1], value)


def _type_of(type_id) -> int:
    return ARRAY if isinstance(type_id, tuple) else type_id


def write(path: str | os.PathLike, metadata, tensors, alignment: int = 32) -> None:
    head = [MAGIC, struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    for key, type_id, value in metadata:
        head += [_string(key), struct.pack("<I", _type_of(type_id)), _value(type_id, value)]
    offset, placed = 0, []
    for name, type_id, ne, data in tensors:
        data = data.contiguous().view(torch.uint8).reshape(-1)
        _, block, size = TENSOR_TYPES[type_id]
        count = int(np.prod(ne)) if ne else 1
        if count // block * size != data.numel():
            raise ValueError(f"GGUF write: tensor {name!r}: {data.numel()} bytes, {TENSOR_TYPES[type_id][0]} "
                             f"{list(ne)} needs {count // block * size}")  # fmt: skip
        head += [_string(name), struct.pack("<I", len(ne)), struct.pack(f"<{len(ne)}Q", *ne),
                 struct.pack("<IQ", type_id, offset)]  # fmt: skip
        placed.append((offset, data))
        offset = -(-(offset + data.numel()) // alignment) * alignment
    header = b"".join(head)
    start = -(-len(header) // alignment) * alignment
    with open(path, "wb") as out:
        out.write(header)
        out.write(b"\0" * (start - len(header)))
        written = 0
        for at, data in placed:
            out.write(b"\0" * (at - written))
            out.write(data.numpy().tobytes())
            written = at + data.numel()
        out.write(b"\0" * (offset - written))
