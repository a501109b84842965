"""Write safetensors shards while tensors arrive, holding none of them in memory.

A safetensors file (little endian) is ``u64 N`` | ``N`` bytes of JSON header ``{key: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {"format": "pt"}}`` padded with spaces to a multiple of 8 | the
tensors' bytes back to back, offsets counted from the end of the header. The header must come first but is known
only once the shard is complete, so each tensor's bytes go at once to the open shard's data file; when the next
tensor would take the shard past ``max_shard_bytes`` (a tensor larger than that gets a shard of its own), the header
is written to the shard file and the bytes are copied behind it (``copy_file_range``: by the kernel, through the
page cache, never through this process's memory) in the order ``safetensors.torch.save_file`` uses: element size
descending, then name, so that every tensor starts at a multiple of its element size.

:meth:`ShardWriter.close` names the shards as ``save_pretrained`` does (``model.safetensors`` alone, else
``model-00001-of-0000N.safetensors``), writes ``model.safetensors.index.json`` (``metadata.total_size``,
``weight_map``) when there are several, and removes shard files of an earlier save in the directory that this one
did not write.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import struct

import torch

from qcompile.hf.headers import _DTYPES

#: torch dtype → safetensors dtype string
DTYPE_NAMES = {getattr(torch, name): code for code, name in _DTYPES.items() if hasattr(torch, name)}
INDEX_NAME = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")


#: tensors are written in pieces of this many bytes (a memory-mapped tensor's pages are released piece by piece)
PIECE_BYTES = 4 << 20


def tensor_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of ``tensor`` in row-major order, ``uint8 [nbytes]`` (a view when ``tensor`` is contiguous)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


class ShardWriter:
    """Safetensors shards of at most ``max_shard_bytes`` of tensor data each, written as tensors are added."""

    def __init__(self, directory, max_shard_bytes: int):
        if not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool) or max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.total_size = 0
        self._shards: list[pathlib.Path] = []  # finished shards, under temporary names
        self._shard_of: dict[str, int] = {}  # key → shard index
        self._entries: list[tuple[str, torch.dtype, tuple[int, ...], int, int]] = []  # key, dtype, shape, at, bytes
        self._data = None
        self._size = 0

    def _temporary(self, index: int, suffix: str) -> pathlib.Path:
        return self.directory / f".model-shard-{index + 1:05d}.{suffix}"

    def add(self, key: str, tensor: torch.Tensor, release=None) -> int:
        """Append ``tensor`` under ``key``; returns its byte count. ``release(piece)`` is called on each piece of
        ``tensor``'s bytes once it is written (a memory-mapped tensor then gives its pages back as it goes, so a
        large embedding never becomes resident as a whole)."""
        if key in self._shard_of:
            raise ValueError(f"shard writer: {key} was written already")
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"shard writer: {key} is {tensor.dtype}, which safetensors cannot store")
        data = tensor_bytes(tensor)
        nbytes = data.numel()
        if self._entries and self._size + nbytes > self.max_shard_bytes:
            self._finish_shard()
        if self._data is None:
            self._data = open(self._temporary(len(self._shards), "data"), "wb")  # noqa: SIM115 (closed in finish)
        for piece in data.split(PIECE_BYTES):
            self._data.write(piece.numpy())
            if release is not None:
                release(piece)
        self._entries.append((key, tensor.dtype, tuple(tensor.shape), self._size, nbytes))
        self._size += nbytes
        self.total_size += nbytes
        self._shard_of[key] = len(self._shards)
        return nbytes

    def _finish_shard(self) -> None:
        if self._data is None:
            return
        data_path = self._data.name
        self._data.close()
        self._data = None
        order = sorted(self._entries, key=lambda e: (-e[1].itemsize, e[0]))
        header, offset = {}, 0
        for key, dtype, shape, _, nbytes in order:
            header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                           "data_offsets": [offset, offset + nbytes]}  # fmt: skip
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % 8)
        shard = self._temporary(len(self._shards), "tmp")
        with open(data_path, "rb") as source, open(shard, "wb") as target:
            target.write(struct.pack("<Q", len(text)) + text)
            target.flush()
            for _, _, _, at, nbytes in order:
                _copy_range(source.fileno(), target.fileno(), at, nbytes)
        os.unlink(data_path)
        self._shards.append(shard)
        self._entries, self._size = [], 0

    def close(self) -> list[pathlib.Path]:
        """Finish the last shard, give the shards their final names, write the index; returns the shard paths."""
        self._finish_shard()
        count = len(self._shards)
        if count == 0:
            raise ValueError("shard writer: no tensor was written")
        names = ["model.safetensors"] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]  # fmt: skip
        for old in self.directory.iterdir():  # an earlier save's shards would be read as part of this one
            if (_SHARD_NAME.match(old.name) and old.name not in names) or (old.name == INDEX_NAME and count == 1):
                old.unlink()
        finals = []
        for shard, name in zip(self._shards, names):
            final = self.directory / name
            os.replace(shard, final)
            finals.append(final)
        if count > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {key: names[i] for key, i in sorted(self._shard_of.items())}}  # fmt: skip
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        self._shards = []
        return finals

    def abort(self) -> None:
        """Remove the temporary files (after an error)."""
        if self._data is not None:
            self._data.close()
            pathlib.Path(self._data.name).unlink(missing_ok=True)
            self._data = None
        for shard in self._shards:
            shard.unlink(missing_ok=True)
        self._shards = []


def _copy_range(source: int, target: int, offset: int, count: int) -> None:
    """Append ``count`` bytes of file ``source`` from ``offset`` to file ``target`` (at its current position)."""
    while count > 0:
        try:
            done = os.copy_file_range(source, target, count, offset)
        except (AttributeError, OSError):  # no copy_file_range (or not across these file systems): by chunks
            done = 0
        if done <= 0:
            chunk = os.pread(source, min(count, 1 << 24), offset)
            if not chunk:
                raise OSError(f"shard writer: the data file ended {count} bytes early")
            done = os.write(target, chunk)
        offset += done
        count -= done
