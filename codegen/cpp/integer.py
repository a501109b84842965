"""C++ kernel rows for the integer families: W8A16 / W4A16 (``int-weight-only``), W8A8 (``w8a8-int8``) and W4A8
(``w4a8-int``). Kernels in ``kernels/weight_only.h``, ``kernels/w8a8.h``, ``kernels/w4a8.h``.

Each row is a ``supports`` predicate (``None`` when the kernel serves the call, else the reason) and a ``bind``
that returns a launcher for one call signature (and hands the C++ op its plan). Weight-only calls of many tokens
dequantize the weight in slices and use torch's float GEMM.
"""

from __future__ import annotations

import torch

from qcompile.codegen import cpp
from qcompile.codegen.cpp import launch
from qcompile.runtime.dispatch import KernelEntry

#: from this many tokens on, weight-only calls dequantize the weight in slices and use torch's float GEMM.
#: Measured on a 2-core AVX2 machine, the direct kernel (4 tokens per unpacked block) was faster up to M=128.
GEMM_MIN_TOKENS = 256
#: bytes of float32 weight dequantized per slice in the GEMM path (fits in L2/L3 next to the activations)
GEMM_SLICE_BYTES = 2 << 20


def _zero_const(scheme) -> float:
    """The zero point of symmetric grids (the kernels take it when there is no ``zeros`` tensor)."""
    return 2.0 ** (scheme.bits - 1) if scheme.symmetric and scheme.bits < 8 else 0.0


# -- weight-only: int8 and int4 -------------------------------------------------------------------------
def weight_only_supports(scheme, x, packed) -> str | None:
    if scheme.bits not in (4, 8):
        return f"{scheme.bits}-bit weights have no C++ kernel (int4 and int8 do)"
    return launch.activation_reason(x)


def _weight_only_params(scheme, k: int) -> tuple[tuple, tuple]:
    return (scheme.bits, scheme.padded_in_features(k), scheme.group_size_for(k)), (_zero_const(scheme),)


def weight_only_bind(scheme, x, packed, bias, n):
    """W8A16 / W4A16 launcher for one call signature (many tokens take the dequantize + GEMM path)."""
    ints, floats = _weight_only_params(scheme, x.shape[-1])

    def gemm(x, packed, bias):
        return dequantize_gemm(scheme, x, packed, bias, n)

    return launch.bind_kernel(scheme, "linear_wo", x, packed, bias, n, ints, floats, GEMM_MIN_TOKENS - 1, gemm)


def dequantize_gemm(scheme, x, packed, bias, n: int) -> torch.Tensor:
    """Many tokens: dequantize slices of N rows once (float32, C++) and multiply with torch's GEMM."""
    k = x.shape[-1]
    x32 = x.reshape(-1, k).to(torch.float32)
    packed = [t.contiguous() for t in packed]
    rows = max(1, min(n, GEMM_SLICE_BYTES // (4 * k)))
    ints, floats = _weight_only_params(scheme, k)
    return launch.sliced_gemm(scheme, x, x32, packed, bias, n, "dequant_wo", ints, floats, (3, 4), rows)


# -- W8A8 and W4A8 -----------------------------------------------------------------------------------------
def w8a8_bind(scheme, x, packed, bias, n):
    """W8A8: per-token dynamic int8 activations × int8 weights, exact int32 sums (see ``w8a8.h``)."""
    return launch.bind_kernel(scheme, "linear_w8a8", x, packed, bias, n)


def w4a8_bind(scheme, x, packed, bias, n):
    """W4A8: per-token dynamic int8 activations × int4 group-wise weights, exact int32 sums (see ``w4a8.h``)."""
    k = x.shape[-1]
    ints = (scheme.padded_in_features(k), scheme.group_size_for(k))
    return launch.bind_kernel(scheme, "linear_w4a8", x, packed, bias, n, ints, (8.0,))


def _only_bits(bits: int):
    def supports(scheme, x, packed):
        reason = weight_only_supports(scheme, x, packed)
        if reason is None and scheme.bits != bits:
            return f"{scheme.name} is served by another row"
        return reason

    return supports


def _activations(scheme, x, packed):
    return launch.activation_reason(x)


def kernel_entries(family: str) -> list[KernelEntry]:
    """The rows of ``family`` (none without a C++ compiler; a warning says so once)."""
    if not cpp.available():
        return []
    rows = {
        "int-weight-only": [
            KernelEntry("cpp-w8a16", "cpu", (family,), _only_bits(8), weight_only_bind, cpp.PRIORITY),
            KernelEntry("cpp-w4a16", "cpu", (family,), _only_bits(4), weight_only_bind, cpp.PRIORITY),
        ],
        "w8a8-int8": [KernelEntry("cpp-w8a8", "cpu", (family,), _activations, w8a8_bind, cpp.PRIORITY)],
        "w4a8-int": [KernelEntry("cpp-w4a8", "cpu", (family,), _activations, w4a8_bind, cpp.PRIORITY)],
    }
    return rows.get(family, [])
