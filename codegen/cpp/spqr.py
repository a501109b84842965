"""C++ kernel row of the SpQR family (``kernels/spqr.h``, ``kernels/spqr_linear.h``): ``cpp-spqr``.

Up to ``GEMM_MIN_TOKENS - 1`` tokens (decode) ``linear_spqr`` does it all: the activation is gathered through
``in_perm`` once per call; per block of 16 rows and chunk of tiles, each tile's float16 statistics become small tables
(the 8 scales and zeros its rows can take), each row's 16 codes of a tile look up the 8 values they can take (float16
weights exactly as ``spqr_quant`` computes them), the decoded rows are dotted with every token, and each row's CSR
outliers are added. On AVX-512 CPUs with AVX512-FP16 the tables are built with float16 arithmetic
(:data:`FLOAT16_ARITHMETIC`; the same bits). Calls of more tokens gather the activation in torch, dequantize the
weight (dense part plus outliers, permuted column order) in slices of rows (``dequant_spqr``) and use torch's GEMM.
"""

from __future__ import annotations

import torch

from qcompile.codegen import cpp
from qcompile.codegen.cpp import launch
from qcompile.runtime.dispatch import KernelEntry
from qcompile.schemes.spqr import permutation

#: from this many tokens on, calls take the dequantize + GEMM path
GEMM_MIN_TOKENS = 16
#: bytes of float32 weight dequantized per slice in the GEMM path (a multiple of 16 rows)
GEMM_SLICE_BYTES = 2 << 20
#: let the AVX-512 kernels build their float16 tables with AVX512-FP16 arithmetic where the CPU has it (same values,
#: bit for bit, as the float32 + vcvtps2ph route; tests turn it off to check that route too)
FLOAT16_ARITHMETIC = True


def supports(scheme, x, packed) -> str | None:
    return launch.activation_reason(x)


def bind(scheme, x, packed, bias, n):
    k = x.shape[-1]
    kp = scheme.padded_in_features(k)
    ints = (kp, int(FLOAT16_ARITHMETIC))

    def gemm(x, packed, bias):
        return dequantize_gemm(scheme, kp, x, packed, bias, n)

    return launch.bind_kernel(scheme, "linear_spqr", x, packed, bias, n, ints, (), GEMM_MIN_TOKENS - 1, gemm)


def gathered(x2: torch.Tensor, in_perm: torch.Tensor, kp: int) -> torch.Tensor:
    """``x2 [M, K]`` → ``[M, Kp]`` with column ``j`` = feature ``perm[j]`` (0 for the padding features ``>= K``)."""
    padded = torch.nn.functional.pad(x2, (0, kp - x2.shape[1]))
    return padded.index_select(1, permutation(in_perm)).contiguous()


def dequantize_gemm(scheme, kp: int, x, packed, bias, n: int) -> torch.Tensor:
    """Many tokens: the gathered activation ``[M, Kp]`` times slices of dequantized rows (C++), torch's GEMM."""
    packed = [t.contiguous() for t in packed]
    xg = gathered(x.reshape(-1, x.shape[-1]), packed[3], kp)
    rows = max(16, min(-(-n // 16) * 16, GEMM_SLICE_BYTES // (4 * kp) // 16 * 16))
    ints = (kp, 0, 0, int(FLOAT16_ARITHMETIC))
    return launch.sliced_gemm(scheme, x, xg, packed, bias, n, "dequant_spqr", ints, (), (1, 2), rows)


def kernel_entries(family: str) -> list[KernelEntry]:
    """The ``cpp-spqr`` row (none without a C++ compiler; a warning says so once)."""
    if family != "spqr" or not cpp.available():
        return []
    return [KernelEntry("cpp-spqr", "cpu", ("spqr",), supports, bind, cpp.PRIORITY)]
