"""C++ kernel row of the VPTQ family (``kernels/vptq.h``, ``kernels/vptq_linear.h``): ``cpp-vptq``.

Up to ``GEMM_MIN_TOKENS - 1`` tokens (decode) one kernel does it all: the activation is permuted and scaled once
(``xs = x[:, perm] * scale[perm]``, plus the per-token ``x . weight_bias``), then each thread takes blocks of vector
rows and adds every column's centroid (``v`` floats) times ``xs`` into the rows' ``v`` outputs. For ``v`` a multiple
of 4 (but 20, 28) on AVX2 / AVX-512 the block's outputs of one token or a group of 4 stay in vector registers and the
indices are decoded 64 columns at a time; a small residual codebook is summed with the main one once per call. Calls
of more tokens dequantize the weight in slices of rows (``dequant_vptq``, float32) and use torch's float GEMM.
"""

from __future__ import annotations

import torch

from qcompile.codegen import cpp
from qcompile.codegen.cpp import launch
from qcompile.runtime.dispatch import KernelEntry

#: from this many tokens on, calls take the dequantize + GEMM path
GEMM_MIN_TOKENS = 16
#: bytes of float32 weight dequantized per slice in the GEMM path
GEMM_SLICE_BYTES = 2 << 20


def params(scheme, n: int, k: int) -> tuple[int, ...]:
    """``ints`` of the VPTQ kernels for ``scheme`` and an ``[N, K]`` weight: v, bk, br, o, R, Wd."""
    return (scheme.vector_len, scheme.index_bits, scheme.res_bits, scheme.outliers, scheme.vector_rows(n),
            scheme.index_words(k))  # fmt: skip


def supports(scheme, x, packed) -> str | None:
    return launch.activation_reason(x)


def bind(scheme, x, packed, bias, n):
    ints = params(scheme, n, x.shape[-1])

    def gemm(x, packed, bias):
        return dequantize_gemm(scheme, ints, x, packed, bias, n)

    return launch.bind_kernel(scheme, "linear_vptq", x, packed, bias, n, ints, (), GEMM_MIN_TOKENS - 1, gemm)


def dequantize_gemm(scheme, ints, x, packed, bias, n: int) -> torch.Tensor:
    """Many tokens: the float32 activation times slices of dequantized rows (C++), torch's GEMM."""
    k = x.shape[-1]
    xw = x.reshape(-1, k).to(torch.float32).contiguous()
    packed = [t.contiguous() for t in packed]
    rows = max(1, min(n, GEMM_SLICE_BYTES // (4 * k)))
    return launch.sliced_gemm(scheme, x, xw, packed, bias, n, "dequant_vptq", (*ints, 0, 0), (), (6, 7), rows)


def kernel_entries(family: str) -> list[KernelEntry]:
    """The ``cpp-vptq`` row (none without a C++ compiler; a warning says so once)."""
    if family != "vptq" or not cpp.available():
        return []
    return [KernelEntry("cpp-vptq", "cpu", ("vptq",), supports, bind, cpp.PRIORITY)]
