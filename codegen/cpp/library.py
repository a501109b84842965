"""ctypes binding of the compiled kernels, and the choice of instruction set.

Every kernel takes one :class:`Call` (``qc_call`` in ``qc_abi.h``) and is found by name in the library's kernel
table (``qc_find_kernel``), so no argument list is written twice. :func:`load` checks the struct's layout against
the one the library was compiled with (``qc_call_layout``) and refuses a mismatch.

The ISA is the best one the CPU runs (``avx512`` > ``avx2`` > ``scalar``), unless ``QCOMPILE_CPU_ISA``
names one (read at every call, so tests can switch it); naming one the CPU cannot run is an error.
"""

from __future__ import annotations

import ctypes
import functools
import os

from qcompile.codegen.cpp import build

ISAS = ("avx512", "avx2", "scalar")  # best first
ISA_ENV = "QCOMPILE_CPU_ISA"
MAX_TENSORS = 8
MAX_PARAMS = 8

_i64, _i32, _ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p


class Call(ctypes.Structure):
    """``qc_call``: one kernel call (see ``qc_abi.h``)."""

    _fields_ = [
        ("x", _ptr), ("y", _ptr), ("bias", _ptr), ("M", _i64), ("K", _i64), ("N", _i64), ("x_bf16", _i32),
        ("y_bf16", _i32), ("threads", _i32), ("n_tensors", _i32), ("tensors", _ptr * MAX_TENSORS),
        ("ints", _i64 * MAX_PARAMS), ("floats", ctypes.c_double * MAX_PARAMS),
    ]  # fmt: skip


KERNEL_TYPE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(Call))
#: the fields whose offsets ``qc_call_layout(1..)`` reports, in its order
_LAYOUT_FIELDS = ("x", "y", "bias", "M", "K", "N", "x_bf16", "y_bf16", "threads", "n_tensors", "tensors", "ints",
                  "floats")  # fmt: skip


@functools.lru_cache(maxsize=1)
def library_file():
    """The path of the compiled library this process loads (built once if the cache lacks it)."""
    return build.build()


@functools.lru_cache(maxsize=1)
def load() -> ctypes.CDLL:
    """Build (or find in the cache) and load the library once per process; check the call struct's layout."""
    lib = ctypes.CDLL(str(library_file()))
    lib.qc_cpu_supports.argtypes = [ctypes.c_char_p]
    lib.qc_cpu_supports.restype = ctypes.c_int
    lib.qc_find_kernel.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    lib.qc_find_kernel.restype = _ptr
    lib.qc_call_layout.argtypes = [ctypes.c_int]
    lib.qc_call_layout.restype = _i64
    lib.qc_kernel_count.restype = ctypes.c_int
    lib.qc_kernel_name.argtypes = [ctypes.c_int]
    lib.qc_kernel_name.restype = ctypes.c_char_p
    expected = [ctypes.sizeof(Call), *(getattr(Call, name).offset for name in _LAYOUT_FIELDS)]
    compiled = [lib.qc_call_layout(i) for i in range(len(expected))]
    if compiled != expected:
        raise build.CompilerError(f"qc_call layout of {library_file()} is {compiled}, the binding expects {expected}")
    return lib


def kernel_names() -> list[str]:
    """Every kernel the library holds (one entry per ISA variant)."""
    lib = load()
    return [lib.qc_kernel_name(i).decode() for i in range(lib.qc_kernel_count())]


@functools.lru_cache(maxsize=None)
def cpu_supports(isa: str) -> bool:
    return bool(load().qc_cpu_supports(isa.encode()))


def available_isas() -> list[str]:
    """The variants this CPU can run, best first."""
    return [isa for isa in ISAS if cpu_supports(isa)]


def active_isa() -> str:
    """``$QCOMPILE_CPU_ISA`` when set (checked against the CPU), else the best variant the CPU runs."""
    forced = os.environ.get(ISA_ENV, "").strip().lower()
    if not forced:
        return available_isas()[0]
    if forced not in ISAS:
        raise ValueError(f"{ISA_ENV}={forced!r} is not one of {', '.join(ISAS)}")
    if not cpu_supports(forced):
        raise RuntimeError(f"{ISA_ENV}={forced!r}: this CPU cannot run it (it runs {', '.join(available_isas())})")
    return forced


def has_kernel(name: str) -> bool:
    return bool(load().qc_find_kernel(name.encode(), b"scalar"))


def kernel(name: str, isa: str | None = None):
    """``fn(ctypes.byref(call)) -> int``: kernel ``name`` for ``isa`` (default :func:`active_isa`)."""
    if isa is None:
        return _current(name, os.environ.get(ISA_ENV, ""))
    return _lookup(name, isa)


@functools.lru_cache(maxsize=None)
def _lookup(name: str, isa: str):
    address = load().qc_find_kernel(name.encode(), isa.encode())
    if not address:
        raise KeyError(f"the CPU kernel library has no kernel {name!r} for {isa}")
    return KERNEL_TYPE(address)


@functools.lru_cache(maxsize=64)
def _current(name: str, forced: str):
    """``kernel(name)`` for one value of ``$QCOMPILE_CPU_ISA`` (a dictionary lookup on the hot path)."""
    return _lookup(name, active_isa())


def kernel_address(name: str, isa: str) -> int:
    """The function address of kernel ``name`` for ``isa`` (0 when absent), for the C++ op's plans."""
    return load().qc_find_kernel(name.encode(), isa.encode()) or 0
