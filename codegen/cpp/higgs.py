"""C++ kernel row of the HIGGS family (``kernels/higgs.h``): ``cpp-higgs``.

Up to ``GEMM_MIN_TOKENS - 1`` tokens (decode) one kernel does it all, so the C++ op serves the call with no Python
in between: the activation is zero-padded and rotated by a fast Walsh–Hadamard transform per block of ``h``, then
each weight row is decoded once (grid values times the group's float16 scale) and dotted with every token. Calls of
more tokens rotate the activation once (``prepare_higgs``), dequantize the weight in slices of rows (``dequant_higgs``,
float32, the rotated basis) and use torch's float GEMM.
"""

from __future__ import annotations

import torch

from qcompile.codegen import cpp
from qcompile.codegen.cpp import launch, library
from qcompile.runtime.dispatch import KernelEntry

#: from this many tokens on, calls take the prepare + dequantize + GEMM path
GEMM_MIN_TOKENS = 16
#: bytes of float32 weight dequantized per slice in the GEMM path
GEMM_SLICE_BYTES = 2 << 20


def params(scheme, k: int) -> tuple[int, ...]:
    """``ints`` of the HIGGS kernels for ``scheme`` and an activation of ``k`` features: Kp, h, g, p, b."""
    return (scheme.padded_in_features(k), scheme.hadamard, scheme.group, scheme.dim, scheme.bits)


def supports(scheme, x, packed) -> str | None:
    return launch.activation_reason(x)


def bind(scheme, x, packed, bias, n):
    ints = params(scheme, x.shape[-1])

    def gemm(x, packed, bias):
        return prepare_dequantize_gemm(scheme, ints, x, packed, bias, n)

    return launch.bind_kernel(scheme, "linear_higgs", x, packed, bias, n, ints, (), GEMM_MIN_TOKENS - 1, gemm)


def prepare(x2: torch.Tensor, ints, threads: int | None = None) -> torch.Tensor:
    """``x2 [M, K]`` (contiguous float32 or bfloat16) → the rotated activation ``xr`` float32 ``[M, Kp]`` (C++)."""
    m, k = x2.shape
    xr = torch.empty((m, ints[0]), dtype=torch.float32)
    call = launch.template("prepare_higgs", k, 0, 0, ints, (), x2.dtype == torch.bfloat16)
    call.x, call.y, call.M = x2.data_ptr(), xr.data_ptr(), m
    call.threads = torch.get_num_threads() if threads is None else threads
    launch.check(library.kernel("prepare_higgs")(call), "higgs prepare", m, k, 0)
    return xr


def prepare_dequantize_gemm(scheme, ints, x, packed, bias, n: int) -> torch.Tensor:
    """Many tokens: the rotated activation ``[M, Kp]`` (C++) times slices of dequantized rows (C++), torch's GEMM."""
    k, kp = x.shape[-1], ints[0]
    xr = prepare(x.reshape(-1, k).contiguous(), ints)
    packed = [t.contiguous() for t in packed]
    rows = max(1, min(n, GEMM_SLICE_BYTES // (4 * kp)))
    return launch.sliced_gemm(scheme, x, xr, packed, bias, n, "dequant_higgs", ints, (), (5, 6), rows)


def kernel_entries(family: str) -> list[KernelEntry]:
    """The ``cpp-higgs`` row (none without a C++ compiler; a warning says so once)."""
    if family != "higgs" or not cpp.available():
        return []
    return [KernelEntry("cpp-higgs", "cpu", ("higgs",), supports, bind, cpp.PRIORITY)]
