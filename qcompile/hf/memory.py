"""Give memory back while weights are quantized one by one during loading (Linux; no-ops elsewhere).

Two things would otherwise grow the peak resident set towards the float model's size, though nothing holds on to
the float weights:

* **the checkpoint's pages**: transformers reads safetensors through a private ``mmap``; every page of a weight that
  was read stays resident in this process while the file is mapped (the embedding, kept float, keeps it mapped).
  :func:`release_file_pages` drops the whole pages inside a consumed weight (``MADV_DONTNEED``: they are clean file
  pages, so a later read would fetch them from the file again, unchanged);
* **the allocator's retained heap**: glibc keeps the freed temporaries of each quantization in its heap, fragmented
  between the small packed tensors that stay alive. :func:`trim_heap` (``malloc_trim``) returns them.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch

_MADV_DONTNEED = 4
_CHECKPOINT_SUFFIXES = (".safetensors",)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        libc.malloc_trim.argtypes = (ctypes.c_size_t,)
        return libc
    except (OSError, AttributeError):  # not glibc
        return None


_LIBC = _libc()


def trim_heap() -> None:
    """Return the heap's free pages to the system (glibc ``malloc_trim(0)``)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _mapped_file(start: int, end: int) -> str | None:
    """The file a private mapping holding ``[start, end)`` maps, or ``None`` (anonymous memory, heap, ...)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, _, high = fields[0].partition("-")
            if int(low, 16) <= start and end <= int(high, 16):
                private = fields[1].endswith("p")
                path = fields[5].strip() if len(fields) == 6 else ""
                return path if private and path.startswith("/") else None
    return None


def release_file_pages(tensor: torch.Tensor) -> int:
    """Drop from this process the whole pages inside ``tensor``'s bytes when they are a memory-mapped checkpoint
    file's (``*.safetensors``); returns the bytes released (0 when the tensor is anything else)."""
    if _LIBC is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return 0
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    low = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    high = end // mmap.PAGESIZE * mmap.PAGESIZE
    if high <= low:
        return 0
    path = _mapped_file(start, end)
    if path is None or not path.endswith(_CHECKPOINT_SUFFIXES):
        return 0
    if _LIBC.madvise(low, high - low, _MADV_DONTNEED) != 0:
        return 0
    return high - low
