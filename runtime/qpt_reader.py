"""Reading a ``.qpt`` file safely: every byte is bounds-checked and hashed before it is used.

No pickle and no ``eval`` touch the file: the header is ``struct``-unpacked, the manifest and graph are
strict JSON, tensors are raw bytes mapped with ``torch.frombuffer``. Every failure raises
:class:`~qcompile.runtime.qpt_format.ArtifactError` naming the part and offset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import os

import torch

from qcompile.runtime.qpt_format import (
    ALIGNMENT, FORMAT_MAJOR, HEADER, HEADER_SIZE, MAGIC, MAX_JSON_MEMBER_BYTES, MAX_MANIFEST_BYTES, MEMBER_KINDS,
    MEMBER_NAME, ArtifactError, align_up, check_little_endian, strict_json,
)  # fmt: skip
from qcompile.runtime.qpt_tensors import read_safetensors

REQUIRED_MEMBERS = {"graph": "json", "weights": "safetensors"}


@dataclasses.dataclass
class Artifact:
    """A validated ``.qpt`` file: its manifest, JSON members and tensors (views into ``buffer``)."""

    path: str
    size: int
    manifest: dict
    json_members: dict[str, object]
    tensors: dict[str, dict[str, torch.Tensor]]
    buffer: object  # the mmap the tensors share


def _version_error(path: str, major: int, minor: int, data: memoryview, size: int) -> ArtifactError:
    from qcompile import __version__

    writer = ""
    try:  # the header and the manifest's "writer" key keep their place in every major version
        (_, _, _, length, _) = HEADER.unpack_from(data, 0)
        if HEADER_SIZE + length <= size and length <= MAX_MANIFEST_BYTES:
            info = strict_json(bytes(data[HEADER_SIZE : HEADER_SIZE + length]), "manifest", MAX_MANIFEST_BYTES)
            writer = f", written by qcompile {info['writer']['qcompile']}"
    except (ArtifactError, KeyError, TypeError):
        pass
    if major > FORMAT_MAJOR:
        return ArtifactError(f"{path}: header: .qpt format {major}.{minor}{writer} is newer than this qcompile "
                             f"({__version__}) reads (format {FORMAT_MAJOR}.x); upgrade qcompile to the version that "
                             "wrote it or later")  # fmt: skip
    return ArtifactError(f"{path}: header: .qpt format {major}.{minor}{writer} predates format {FORMAT_MAJOR}, which "
                         f"this qcompile ({__version__}) reads (format 2 calls qcompile::linear over each scheme's "
                         "declared tensor list); export the model again from its float weights with "
                         "qcompile.export(...) or `qcompile export`")  # fmt: skip


def _check_zero(data: memoryview, begin: int, end: int, where: str) -> None:
    if any(data[begin:end]):
        raise ArtifactError(f"{where}: padding bytes {begin}..{end} are not zero")


def _members(manifest: dict, path: str, size: int, data_start: int, data: memoryview) -> list[dict]:
    rows = manifest.get("members")
    if not isinstance(rows, list) or not rows:
        raise ArtifactError(f"{path}: manifest: 'members' must be a non-empty list")
    seen, position = set(), 0
    _check_zero(data, HEADER_SIZE + manifest["_length"], min(data_start, size), f"{path}: after the manifest")
    for index, row in enumerate(rows):
        where = f"{path}: manifest: members[{index}]"
        if not isinstance(row, dict):
            raise ArtifactError(f"{where}: not an object")
        name = row.get("name")
        if not isinstance(name, str) or not MEMBER_NAME.match(name):
            raise ArtifactError(f"{where}: member name {name!r} is not a plain lower-case name "
                                "(no paths, no '..', no '/')")  # fmt: skip
        where = f"{path}: member {name!r}"
        if name in seen:
            raise ArtifactError(f"{where}: listed twice")
        seen.add(name)
        if row.get("kind") not in MEMBER_KINDS:
            kinds = ", ".join(MEMBER_KINDS)
            raise ArtifactError(f"{where}: kind {row.get('kind')!r} is not one this qcompile reads ({kinds})")
        offset, length = row.get("offset"), row.get("size")
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
            raise ArtifactError(f"{where}: offset and size must be non-negative integers")
        if offset % ALIGNMENT:
            raise ArtifactError(f"{where}: offset {offset} is not a multiple of {ALIGNMENT}")
        if offset < position:
            raise ArtifactError(f"{where}: offset {offset} overlaps the member before it (which ends at {position})")
        if offset > align_up(position):
            raise ArtifactError(f"{where}: offset {offset} leaves a gap after the member before (ends at {position})")
        if data_start + offset + length > size:
            begin, end = data_start + offset, data_start + offset + length
            raise ArtifactError(f"{where}: bytes {begin}..{end} run past the end of the {size}-byte file (truncated?)")
        _check_zero(data, data_start + position, data_start + offset, where)
        position = offset + length
    if data_start + position != size:
        raise ArtifactError(f"{path}: {size - data_start - position} unexpected bytes after the last member "
                            f"(file offset {data_start + position})")  # fmt: skip
    for name, kind in REQUIRED_MEMBERS.items():
        if not any(r["name"] == name and r["kind"] == kind for r in rows):
            raise ArtifactError(f"{path}: manifest: required member {name!r} ({kind}) is missing")
    return rows


def read_artifact(path: str | os.PathLike, verify: bool = True) -> Artifact:
    """Open and validate ``path``; ``verify=False`` skips the sha256 of the members (never the bounds checks)."""
    check_little_endian()
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < HEADER_SIZE:
                raise ArtifactError(f"{path}: header: the file has {size} bytes, a .qpt header needs {HEADER_SIZE}")
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError as error:
        raise ArtifactError(f"{path}: cannot be read ({error.strerror})") from None
    data = memoryview(buffer)
    magic, major, minor, length, digest = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise ArtifactError(f"{path}: header: magic {bytes(magic)!r} at offset 0, expected {MAGIC!r}: not a .qpt file")
    if major != FORMAT_MAJOR:
        raise _version_error(path, major, minor, data, size)
    if length > MAX_MANIFEST_BYTES or HEADER_SIZE + length > size:
        raise ArtifactError(f"{path}: header: manifest length {length} (offset 8) runs past the end of the "
                            f"{size}-byte file or over the {MAX_MANIFEST_BYTES}-byte limit")  # fmt: skip
    manifest_bytes = data[HEADER_SIZE : HEADER_SIZE + length]
    if hashlib.sha256(manifest_bytes).digest() != digest:
        raise ArtifactError(f"{path}: manifest: checksum mismatch (bytes {HEADER_SIZE}..{HEADER_SIZE + length}); "
                            "the file is corrupt or was modified")  # fmt: skip
    manifest = strict_json(bytes(manifest_bytes), f"{path}: manifest", MAX_MANIFEST_BYTES)
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: manifest: not a JSON object")
    fmt = manifest.get("format")
    if not isinstance(fmt, dict) or fmt.get("major") != major or fmt.get("minor") != minor:
        raise ArtifactError(f"{path}: manifest: format {fmt!r} disagrees with the header ({major}.{minor})")
    data_start = align_up(HEADER_SIZE + length)
    rows = _members({**manifest, "_length": length}, path, size, data_start, data)
    json_members, tensors = {}, {}
    for row in rows:
        begin = data_start + row["offset"]
        blob = data[begin : begin + row["size"]]
        where = f"{path}: member {row['name']!r}"
        if row["kind"] == "json":
            if verify and hashlib.sha256(blob).hexdigest() != row.get("sha256"):
                raise ArtifactError(f"{where}: checksum mismatch (bytes {begin}..{begin + row['size']})")
            json_members[row["name"]] = strict_json(bytes(blob), where, MAX_JSON_MEMBER_BYTES)
        else:
            table = row.get("tensors")
            if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
                raise ArtifactError(f"{where}: manifest row needs a 'tensors' table")
            tensors[row["name"]] = read_safetensors(blob, where, table, begin, row.get("sha256"), verify)
    return Artifact(path, size, manifest, json_members, tensors, buffer)
