"""C++ kernel row of the AQLM family (``kernels/aqlm.h``): ``cpp-aqlm``.

Up to ``GEMM_MIN_TOKENS - 1`` tokens (decode) one kernel does it all, so the C++ op serves the call with no Python in
between: codebooks of up to 8 bits per code go through per-token look-up tables of ``x_g . C[m, c]`` and a gather-add
over each row's codes; wider codes (``aqlm-1x16``) sum each row's codebook vectors and dot the row with the tokens.
Calls of more tokens dequantize the weight in slices of rows (``dequant_aqlm``, float32) and use torch's float GEMM on
the activation zero-padded to ``Kp``.
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


def params(scheme, k: int) -> tuple[int, ...]:
    """``ints`` of the AQLM kernels for ``scheme`` and an activation of ``k`` features: Kp, ig, M, B."""
    return (scheme.padded_in_features(k), scheme.group_size, scheme.num_codebooks, scheme.bits)


def supports(scheme, x, packed) -> str | None:
    return launch.activation_reason(x)


def bind(scheme, x, packed, bias, n):
    ints = params(scheme, x.shape[-1])

    def gemm(x, packed, bias):
        return dequantize_gemm(scheme, ints, x, packed, bias, n)

    return launch.bind_kernel(scheme, "linear_aqlm", x, packed, bias, n, ints, (), GEMM_MIN_TOKENS - 1, gemm)


def dequantize_gemm(scheme, ints, x, packed, bias, n: int) -> torch.Tensor:
    """Many tokens: the activation zero-padded to ``Kp`` (float32) times slices of dequantized rows (C++), torch's
    GEMM."""
    k, kp = x.shape[-1], ints[0]
    xw = torch.nn.functional.pad(x.reshape(-1, k).to(torch.float32), (0, kp - k)).contiguous()
    packed = [t.contiguous() for t in packed]
    rows = max(1, min(n, GEMM_SLICE_BYTES // (4 * kp)))
    return launch.sliced_gemm(scheme, x, xw, packed, bias, n, "dequant_aqlm", ints, (), (4, 5), rows)


def kernel_entries(family: str) -> list[KernelEntry]:
    """The ``cpp-aqlm`` row (none without a C++ compiler; a warning says so once)."""
    if family != "aqlm" or not cpp.available():
        return []
    return [KernelEntry("cpp-aqlm", "cpu", ("aqlm",), supports, bind, cpp.PRIORITY)]
