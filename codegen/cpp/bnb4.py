"""C++ kernel row ``cpp-bnb4`` for ``bnb4`` (bitsandbytes' 4-bit state, blocks over the flattened weight):
``kernels/bnb4.h``.

The kernel reads the packed state as it is (``qweight``, ``absmax``, and with double quantization the 8-bit absmax
codes, ``nested_absmax``, ``nested_offset``); parameters ``ints``: blocksize, table (0 NF4, 1 FP4), double quant.
Calls of many tokens dequantize the weight in slices of rows (``dequant_bnb4``, float32) and use torch's GEMM.
"""

from __future__ import annotations

import torch

from qcompile.codegen import cpp
from qcompile.codegen.cpp import launch
from qcompile.runtime.dispatch import KernelEntry

#: from this many tokens on, calls dequantize slices of rows and use torch's float GEMM
GEMM_MIN_TOKENS = 256
#: bytes of float32 weight dequantized per slice in the GEMM path
GEMM_SLICE_BYTES = 2 << 20


def params(scheme) -> tuple[int, int, int]:
    """``ints`` of the bnb4 kernels: blocksize, table (0 NF4, 1 FP4), double quantization (0/1)."""
    return scheme.blocksize, int(scheme.quant_type == "fp4"), int(scheme.double_quant)


def supports(scheme, x, packed) -> str | None:
    return launch.activation_reason(x)


def bind(scheme, x, packed, bias, n):
    """``launch(x, packed, bias)`` for one call signature; many tokens take the dequantize + GEMM path."""
    ints = params(scheme)

    def gemm(x, packed, bias):
        return dequantize_gemm(scheme, x, packed, bias, n)

    return launch.bind_kernel(scheme, "linear_bnb4", x, packed, bias, n, ints, (), GEMM_MIN_TOKENS - 1, gemm)


def dequantize_gemm(scheme, x, packed, bias, n: int) -> torch.Tensor:
    """Float32 rows of the weight (``dequant_bnb4``, a slice at a time) times the activation with torch's GEMM."""
    k = x.shape[-1]
    x32 = x.reshape(-1, k).to(torch.float32)
    packed = [t.contiguous() for t in packed]
    rows = max(1, min(n, GEMM_SLICE_BYTES // (4 * k)))
    return launch.sliced_gemm(scheme, x, x32, packed, bias, n, "dequant_bnb4", params(scheme), (), (3, 4), rows)


def kernel_entries(family: str) -> list[KernelEntry]:
    """The bnb4 row (none without a C++ compiler; a warning says so once)."""
    if family != "bnb4" or not cpp.available():
        return []
    return [KernelEntry("cpp-bnb4", "cpu", (family,), supports, bind, cpp.PRIORITY)]
