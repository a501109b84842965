"""C++ kernel row for ``nvfp4``: the FP4 kernel of ``kernels/fp4.h`` with e4m3 block scales times the tensor's
float32 global scale (the binding is :mod:`.mxfp4`'s)."""

from __future__ import annotations

from qcompile.codegen.cpp.mxfp4 import KIND_E4M3, rows
from qcompile.runtime.dispatch import KernelEntry


def kernel_entries(family: str) -> list[KernelEntry]:
    return rows(family, "cpp-nvfp4", KIND_E4M3) if family == "nvfp4" else []
