"""Tensor members of a ``.qpt`` file: standard safetensors blobs, written aligned and read without copies.

A safetensors blob is ``u64 N`` (little-endian), ``N`` bytes of JSON header
(``{name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {...}}``), then the
data. This writer pads the header with spaces so the data starts 64-byte aligned, and orders tensors by
element size (largest first), so every tensor starts at a multiple of its own element size and the
reader can map it straight from the file (``torch.frombuffer`` on a copy-on-write ``mmap``).

The reader trusts nothing: header length, dtype codes, shapes (products that overflow int64), offsets
(inside the blob, sorted, no gap, no overlap, nothing after the last tensor), alignment, byte length =
element size × element count, agreement with the manifest's table, and the sha256 of every tensor.
"""

from __future__ import annotations

import hashlib
import json
import struct

import torch

from qcompile.runtime.qpt_format import (
    ALIGNMENT, DTYPE_CODES, DTYPES, INT64_MAX, MAX_SAFETENSORS_HEADER_BYTES, ArtifactError, align_up,
    check_dotted_name, shape_numel, strict_json,
)  # fmt: skip


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (row-major), without a copy when it is contiguous."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def tensor_entry(tensor: torch.Tensor) -> dict:
    """The manifest row of a tensor: dtype code, shape and sha256 of its bytes."""
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in DTYPE_CODES:
        raise ValueError(f"dtype {tensor.dtype} cannot be stored in a .qpt file")
    digest = hashlib.sha256(tensor_bytes(tensor)).hexdigest()
    return {"dtype": DTYPE_CODES[dtype], "shape": list(tensor.shape), "sha256": digest}


def safetensors_layout(tensors: dict[str, torch.Tensor]) -> tuple[bytes, list[str], int]:
    """``(header bytes including the u64 length, tensor names in data order, total blob size)``."""
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_CODES[str(t.dtype).removeprefix("torch.")], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (align_up(8 + len(text), ALIGNMENT) - 8 - len(text))
    return struct.pack("<Q", len(text)) + text, order, 8 + len(text) + offset


def read_safetensors(blob: memoryview, where: str, table: dict, file_offset: int, header_sha256: str | None,
                     verify: bool = True) -> dict[str, torch.Tensor]:  # fmt: skip
    """Validate ``blob`` against the manifest ``table`` (``{name: {"dtype", "shape", "sha256"}}``) and return
    its tensors, sharing memory with ``blob``. ``file_offset`` (where the blob starts) only feeds messages."""
    if len(blob) < 8:
        raise ArtifactError(f"{where}: {len(blob)} bytes, too short for a safetensors header")
    (n,) = struct.unpack_from("<Q", blob, 0)
    if n > MAX_SAFETENSORS_HEADER_BYTES or 8 + n > len(blob):
        raise ArtifactError(f"{where}: safetensors header length {n} (at file offset {file_offset}) runs past "
                            f"the member's {len(blob)} bytes")  # fmt: skip
    if verify and header_sha256 is not None and hashlib.sha256(blob[: 8 + n]).hexdigest() != header_sha256:
        raise ArtifactError(f"{where}: safetensors header checksum mismatch (file offset {file_offset})")
    header = strict_json(bytes(blob[8 : 8 + n]), f"{where}: safetensors header", MAX_SAFETENSORS_HEADER_BYTES)
    if not isinstance(header, dict):
        raise ArtifactError(f"{where}: safetensors header is not an object")
    header.pop("__metadata__", None)
    data_start, data_size = 8 + n, len(blob) - 8 - n
    if set(header) != set(table):
        missing, extra = sorted(set(table) - set(header)), sorted(set(header) - set(table))
        raise ArtifactError(f"{where}: tensors differ from the manifest (missing {missing[:5]}, unlisted {extra[:5]})")
    spans = []
    for name, info in header.items():
        tw = f"{where}: tensor {name!r}"
        check_dotted_name(name, tw)
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ArtifactError(f"{tw}: header entry must hold exactly dtype, shape and data_offsets")
        if info["dtype"] not in DTYPES:
            raise ArtifactError(f"{tw}: unknown dtype {info['dtype']!r}")
        numel = shape_numel(info["shape"], tw)
        itemsize = DTYPES[info["dtype"]][1]
        expected = table[name]
        if info["dtype"] != expected.get("dtype") or info["shape"] != expected.get("shape"):
            raise ArtifactError(f"{tw}: is {info['dtype']}{info['shape']} in the blob but "
                                f"{expected.get('dtype')}{expected.get('shape')} in the manifest")  # fmt: skip
        offsets = info["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise ArtifactError(f"{tw}: data_offsets must be two integers")
        begin, end = offsets
        if numel * itemsize > INT64_MAX or not 0 <= begin <= end <= data_size:
            raise ArtifactError(f"{tw}: data_offsets {offsets} fall outside the {data_size} data bytes "
                                f"(file offset {file_offset + data_start})")  # fmt: skip
        if end - begin != numel * itemsize:
            raise ArtifactError(f"{tw}: {end - begin} bytes for {numel} elements of {itemsize} bytes")
        if (file_offset + data_start + begin) % itemsize:
            raise ArtifactError(f"{tw}: data at file offset {file_offset + data_start + begin} is not aligned")
        spans.append((begin, end, name))
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            kind = "overlaps the tensor before it" if begin < position else f"leaves a gap of {begin - position} bytes"
            raise ArtifactError(f"{where}: tensor {name!r} at data offset {begin} {kind}")
        position = end
    if position != data_size:
        raise ArtifactError(f"{where}: {data_size - position} bytes after the last tensor "
                            f"(file offset {file_offset + data_start + position})")  # fmt: skip
    out = {}
    for begin, end, name in spans:
        info = header[name]
        chunk = blob[data_start + begin : data_start + end]
        if verify and hashlib.sha256(chunk).hexdigest() != table[name].get("sha256"):
            first, last = file_offset + data_start + begin, file_offset + data_start + end
            raise ArtifactError(f"{where}: tensor {name!r} checksum mismatch (bytes {first}..{last}): "
                                "the file is corrupt or was modified")  # fmt: skip
        dtype = getattr(torch, DTYPES[info["dtype"]][0])
        if end == begin:
            tensor = torch.empty(info["shape"], dtype=dtype)
        else:
            count = (end - begin) // DTYPES[info["dtype"]][1]
            tensor = torch.frombuffer(blob, dtype=dtype, count=count, offset=data_start + begin).reshape(info["shape"])
        if dtype == torch.bool and tensor.numel() and tensor.view(torch.uint8).max() > 1:
            raise ArtifactError(f"{where}: bool tensor {name!r} holds bytes other than 0 and 1")
        out[name] = tensor
    return out
