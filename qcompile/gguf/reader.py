"""A hardened GGUF reader: every count, length, shape and offset is checked against the file before it is used.

GGUF (v2 and v3; little-endian) is ``magic "GGUF" | version u32 | tensor_count u64 | kv_count u64``, then
``kv_count`` pairs ``key string | value_type u32 | value``, then ``tensor_count`` infos ``name string | n_dims u32 |
ne u64[n_dims] | type u32 | offset u64``, then, at the next multiple of ``general.alignment`` (default 32), the data
section; a tensor's ``offset`` is relative to it. ``string`` is ``length u64 | UTF-8 bytes``; an array value is
``item_type u32 | count u64 | items``. ``ne`` is ggml's order: ``ne[0]`` is the row length (a numpy/torch shape is
``ne`` reversed).

Bad input raises :class:`GGUFError` naming the file, what was being read (key or tensor) and the byte offset:
truncation, counts or lengths larger than the bytes left could hold, more than 4 dimensions, shapes whose element
count overflows int64, rows that are not whole blocks, unknown value or tensor types, offsets that are misaligned,
past the end or overlapping, duplicate keys or tensor names, invalid UTF-8.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path

import numpy as np
import torch

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
INT64_MAX = 2**63 - 1
MAX_ARRAY_DEPTH = 4

#: GGUF metadata value types: id → (name, struct format or None)
VALUE_TYPES = {
    0: ("uint8", "<B"), 1: ("int8", "<b"), 2: ("uint16", "<H"), 3: ("int16", "<h"), 4: ("uint32", "<I"),
    5: ("int32", "<i"), 6: ("float32", "<f"), 7: ("bool", "<?"), 8: ("string", None), 9: ("array", None),
    10: ("uint64", "<Q"), 11: ("int64", "<q"), 12: ("float64", "<d"),
}  # fmt: skip
STRING, ARRAY = 8, 9

#: ggml tensor types a file may hold: id → (name, elements per block, bytes per block) (ggml.c type traits; Q8_1, a
#: run-time type of the CPU dot products, is not one)
TENSOR_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}  # fmt: skip
TYPE_IDS = {name: type_id for type_id, (name, _, _) in TENSOR_TYPES.items()}
#: element types read as plain torch tensors
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64}  # fmt: skip


class GGUFError(ValueError):
    """A GGUF file that cannot be read safely; the message names the file, the key or tensor, and the offset."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor: ``shape`` in ggml order (``ne``), ``offset`` absolute in the file, ``nbytes`` its data."""

    name: str
    type_id: int
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return TENSOR_TYPES[self.type_id][0]

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """Row-major shape (``ne`` reversed): ``[N, K]`` for a matrix whose rows have ``K = ne[0]`` elements."""
        return tuple(reversed(self.shape)) or (1,)

    @property
    def row_bytes(self) -> int:
        _, block, size = TENSOR_TYPES[self.type_id]
        return self.shape[0] // block * size if self.shape else size


@dataclasses.dataclass
class GGUFFile:
    """A parsed GGUF file: ``metadata`` (key → Python value; arrays as lists), ``value_types`` (key → ``(type id,
    item type id or None)``), ``tensors`` (name → :class:`TensorInfo`, in file order)."""

    path: Path
    version: int
    metadata: dict
    value_types: dict
    tensors: dict
    alignment: int
    data_offset: int
    buffer: np.ndarray

    def raw(self, name: str) -> torch.Tensor:
        """A tensor's bytes as ``uint8 [rows, row_bytes]`` (a copy)."""
        info = self.tensors[name]
        data = self.buffer[info.offset : info.offset + info.nbytes]
        rows = info.nbytes // info.row_bytes if info.row_bytes else 0
        return torch.from_numpy(np.array(data, copy=True)).reshape(rows, info.row_bytes)

    def tensor(self, name: str) -> torch.Tensor:
        """A float or integer tensor (F32, F16, BF16, F64, I8 … I64) in its row-major shape."""
        info = self.tensors[name]
        dtype = FLOAT_DTYPES.get(info.type_name)
        if dtype is None:
            raise GGUFError(f"{self.path}: tensor {name!r} is {info.type_name}, not a plain float or integer type")
        return self.raw(name).view(dtype).reshape(info.torch_shape)


class _Cursor:
    def __init__(self, data: np.ndarray, path: Path):
        self.data, self.path, self.pos, self.size = data, path, 0, len(data)
        self.view = memoryview(data)

    def fail(self, what: str, message: str, at: int | None = None) -> GGUFError:
        return GGUFError(f"{self.path}: {what} at offset {self.pos if at is None else at}: {message}")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.size - self.pos:
            raise self.fail(what, f"needs {n} bytes, the file has {self.size - self.pos} left (truncated?)")
        out = self.view[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        if n > self.size - self.pos:
            raise self.fail(what, f"needs {n} bytes, the file has {self.size - self.pos} left (truncated?)")
        self.pos += n
        return struct.unpack_from(fmt, self.view, self.pos - n)[0]

    def string(self, what: str) -> str:
        start = self.pos
        length = self.unpack("<Q", what)
        if length > self.size - self.pos:
            raise self.fail(what, f"string length {length} exceeds the {self.size - self.pos} bytes left", start)
        raw = self.take(length, what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as error:
            raise self.fail(what, f"string is not UTF-8 ({error.reason} at byte {error.start})", start) from None

    def value(self, type_id: int, what: str, depth: int = 0):
        start = self.pos
        if type_id not in VALUE_TYPES:
            raise self.fail(what, f"unknown value type {type_id} (known: 0..12)", start - 4)
        if type_id == STRING:
            return self.string(what), None
        if type_id != ARRAY:
            return self.unpack(VALUE_TYPES[type_id][1], what), None
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(what, f"arrays nested deeper than {MAX_ARRAY_DEPTH}")
        item = self.unpack("<I", what)
        count = self.unpack("<Q", what)
        if item not in VALUE_TYPES:
            raise self.fail(what, f"array of unknown value type {item}", start)
        fmt = VALUE_TYPES[item][1]
        smallest = struct.calcsize(fmt) if fmt else (8 if item == STRING else 12)
        if count > (self.size - self.pos) // smallest:
            raise self.fail(what, f"array count {count} of {VALUE_TYPES[item][0]} exceeds what the "
                                  f"{self.size - self.pos} bytes left can hold", start)  # fmt: skip
        if fmt:
            dtype = np.dtype(fmt.replace("?", "b1"))
            raw = self.take(count * dtype.itemsize, what)
            values = np.frombuffer(raw, dtype=dtype)
            return values.tolist(), item
        return [self.value(item, what, depth + 1)[0] for _ in range(count)], item


def _open(path: Path) -> np.ndarray:
    if os.path.getsize(path) == 0:
        raise GGUFError(f"{path}: empty file")
    return np.memmap(path, dtype=np.uint8, mode="r")


def read(path: str | os.PathLike) -> GGUFFile:
    """Parse and check ``path``; tensor data stays in the file (memory-mapped) until :meth:`GGUFFile.raw`."""
    path = Path(path)
    cursor = _Cursor(_open(path), path)
    magic = bytes(cursor.take(4, "magic"))
    if magic != MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (magic {magic!r} at offset 0, expected {MAGIC!r})")
    version = cursor.unpack("<I", "version")
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} at offset 4 is not supported (2 and 3 are)")
    tensor_count = cursor.unpack("<Q", "tensor count")
    kv_count = cursor.unpack("<Q", "metadata count")
    left = cursor.size - cursor.pos
    if kv_count > left // 13:  # key length u64 + one byte of key + type u32 + one byte of value, at least
        raise GGUFError(f"{path}: metadata count {kv_count} at offset 16 exceeds what {left} bytes can hold")
    if tensor_count > left // 24:  # name length u64 + n_dims u32 + type u32 + offset u64, at least
        raise GGUFError(f"{path}: tensor count {tensor_count} at offset 8 exceeds what {left} bytes can hold")

    metadata, value_types = {}, {}
    for index in range(kv_count):
        key_at = cursor.pos
        key = cursor.string(f"metadata key #{index}")
        if key in metadata:
            raise cursor.fail(f"metadata key {key!r}", "duplicate key", key_at)
        type_id = cursor.unpack("<I", f"metadata {key!r} type")
        value, item = cursor.value(type_id, f"metadata {key!r}")
        metadata[key], value_types[key] = value, (type_id, item)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if value_types.get("general.alignment", (4,))[0] != 4 or not isinstance(alignment, int) or alignment <= 0 or \
            alignment & (alignment - 1):  # fmt: skip
        raise GGUFError(f"{path}: general.alignment {alignment!r} is not a power of two (uint32)")

    infos = []
    for index in range(tensor_count):
        name = cursor.string(f"tensor #{index} name")
        what = f"tensor {name!r}"
        dims_at = cursor.pos
        n_dims = cursor.unpack("<I", what)
        if n_dims > MAX_DIMS:
            raise cursor.fail(what, f"{n_dims} dimensions (at most {MAX_DIMS})", dims_at)
        shape = tuple(cursor.unpack("<Q", what) for _ in range(n_dims))
        count = 1
        for dim in shape:
            count *= dim
        if any(dim > INT64_MAX for dim in shape) or count > INT64_MAX:
            raise cursor.fail(what, f"shape {list(shape)} has {count} elements, more than int64 holds", dims_at)
        type_at = cursor.pos
        type_id = cursor.unpack("<I", what)
        if type_id not in TENSOR_TYPES:
            raise cursor.fail(what, f"unknown ggml type id {type_id}", type_at)
        type_name, block, size = TENSOR_TYPES[type_id]
        if shape and shape[0] % block:
            raise cursor.fail(what, f"{type_name} rows of {shape[0]} elements are not whole {block}-element blocks",
                              dims_at)  # fmt: skip
        offset_at = cursor.pos
        offset = cursor.unpack("<Q", what)
        if offset % alignment:
            raise cursor.fail(what, f"data offset {offset} is not a multiple of the alignment {alignment}", offset_at)
        infos.append((name, type_id, shape, offset, count // block * size, offset_at))

    data_offset = -(-cursor.pos // alignment) * alignment
    tensors = {}
    for name, type_id, shape, offset, nbytes, offset_at in infos:
        if name in tensors:
            raise GGUFError(f"{path}: tensor {name!r} at offset {offset_at}: duplicate tensor name")
        start = data_offset + offset
        if start > cursor.size or nbytes > cursor.size - start:
            raise GGUFError(f"{path}: tensor {name!r} at offset {offset_at}: data [{start}, {start + nbytes}) runs "
                            f"past the end of the file ({cursor.size} bytes)")  # fmt: skip
        tensors[name] = TensorInfo(name, type_id, shape, start, nbytes)
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise GGUFError(f"{path}: tensor {second!r} at offset {start}: its data overlaps tensor {first!r}")
    return GGUFFile(path, version, metadata, value_types, tensors, alignment, data_offset, cursor.data)
