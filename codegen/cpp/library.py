"""ctypes binding of the compiled kernels, and the choice of instruction set.

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

_i64, _int, _ptr, _float = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
_SIGNATURES = {
    "qc_linear_wo": [_ptr, _int, _i64, _i64, _ptr, _int, _i64, _i64, _ptr, _ptr, _float, _i64, _ptr, _ptr, _int, _int],
    "qc_dequant_wo": [_ptr, _int, _i64, _i64, _i64, _ptr, _ptr, _float, _i64, _i64, _i64, _ptr, _int],
    "qc_linear_w8a8": [_ptr, _int, _i64, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _int, _int],
    "qc_linear_w4a8": [_ptr, _int, _i64, _i64, _ptr, _i64, _i64, _ptr, _ptr, _float, _i64, _ptr, _ptr, _int, _int],
}


@functools.lru_cache(maxsize=1)
def library_file():
    """The path of the compiled library this process loads (built once if the cache lacks it)."""
    return build.build()


@functools.lru_cache(maxsize=1)
def load() -> ctypes.CDLL:
    """Build (or find in the cache) and load the library once per process."""
    lib = ctypes.CDLL(str(library_file()))
    for isa in ISAS:
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, f"{name}_{isa}")
            fn.argtypes = argtypes
            fn.restype = _int
    lib.qc_cpu_supports.argtypes = [ctypes.c_char_p]
    lib.qc_cpu_supports.restype = _int
    return lib


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


def kernel(name: str, isa: str | None = None):
    """The ctypes function ``<name>_<isa>`` (``isa`` defaults to :func:`active_isa`)."""
    if isa is None:
        return _current(name, os.environ.get(ISA_ENV, ""))
    return getattr(load(), f"{name}_{isa}")


@functools.lru_cache(maxsize=64)
def _current(name: str, forced: str):
    """``kernel(name)`` for one value of ``$QCOMPILE_CPU_ISA`` (a dictionary lookup on the hot path)."""
    return getattr(load(), f"{name}_{active_isa()}")
