"""Writing a ``.qpt`` file atomically: temp file in the same directory, fsync, rename, fsync the directory.

A crash (or ``SIGKILL``) at any moment leaves either the previous file or the complete new one at
``path``; the temp file (``.<name>.<random>.tmp``) is removed on errors and never loads as a ``.qpt``
because its header is written last.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import torch

from qcompile.runtime.qpt_format import (
    FORMAT_MAJOR, FORMAT_MINOR, HEADER, HEADER_SIZE, MAGIC, align_up, check_little_endian,
)  # fmt: skip
from qcompile.runtime.qpt_tensors import safetensors_layout, tensor_bytes, tensor_entry


def _json_bytes(data) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def plan_members(json_members: dict[str, dict], tensor_members: dict[str, dict[str, torch.Tensor]]):
    """Lay out members back to back, 64-byte aligned. Returns ``(member rows, writers)``: the rows go into the
    manifest, each writer is ``(relative offset, list of byte chunks)``."""
    rows, chunks, offset = [], [], 0
    for name, data in json_members.items():
        payload = _json_bytes(data)
        rows.append({"name": name, "kind": "json", "offset": offset, "size": len(payload),
                     "sha256": hashlib.sha256(payload).hexdigest()})  # fmt: skip
        chunks.append((offset, lambda payload=payload: [payload]))
        offset = align_up(offset + len(payload))
    for name, tensors in tensor_members.items():
        header, order, size = safetensors_layout(tensors)
        table = {key: tensor_entry(tensors[key]) for key in order}
        rows.append({"name": name, "kind": "safetensors", "offset": offset, "size": size,
                     "sha256": hashlib.sha256(header).hexdigest(), "tensors": table})  # fmt: skip
        chunks.append((offset, lambda header=header, order=order, tensors=tensors:
                       [header, *(tensor_bytes(tensors[k]) for k in order)]))  # fmt: skip
        offset = align_up(offset + size)
    return rows, chunks


def write_artifact(path: str | os.PathLike, manifest: dict, json_members: dict[str, dict],
                   tensor_members: dict[str, dict[str, torch.Tensor]]) -> int:  # fmt: skip
    """Write ``manifest`` (its ``format`` and ``members`` keys are filled in here) and the members to ``path``
    atomically. Returns the file size in bytes."""
    check_little_endian()
    rows, chunks = plan_members(json_members, tensor_members)
    manifest = {**manifest, "format": {"name": "qpt", "major": FORMAT_MAJOR, "minor": FORMAT_MINOR}, "members": rows}
    manifest_bytes = _json_bytes(manifest)
    data_start = align_up(HEADER_SIZE + len(manifest_bytes))
    digest = hashlib.sha256(manifest_bytes).digest()
    header = HEADER.pack(MAGIC, FORMAT_MAJOR, FORMAT_MINOR, len(manifest_bytes), digest)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a shared artifact gets the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * HEADER_SIZE)  # the real header goes in last: a torn file has no magic
            f.write(manifest_bytes)
            for offset, make in chunks:
                f.write(b"\0" * (data_start + offset - f.tell()))
                for chunk in make():
                    _write_chunk(f, chunk)
            size = f.tell()
            f.flush()
            os.fsync(f.fileno())
            f.seek(0)
            f.write(header)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)
    return size


def _write_chunk(f, chunk) -> None:
    f.write(chunk)


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # platforms without directory handles (Windows): rename is already durable enough there
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["write_artifact"]
