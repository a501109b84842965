"""C++ kernel rows for the MX 6- and 8-bit families (``kernels/mx.h``): ``cpp-mxfp6`` and ``cpp-mxfp8``.

One kernel serves both, told the element type by its parameters (``ints``: element type, Kp, quantize
activations): the activation is zero-padded to ``Kp`` and, for ``-w6a6`` / ``-w8a8``, quantized per token and group
of 32 inside the kernel, so the C++ op serves decode calls with no Python in between. Calls of many tokens prepare
the activation once (``prepare_mx``), dequantize the weight in slices of rows (``dequant_mx``, float32) and use
torch's float GEMM.
"""

from __future__ import annotations

import torch

from qcompile.codegen import cpp
from qcompile.codegen.cpp import launch, library
from qcompile.runtime.dispatch import KernelEntry

#: the element types of ``kernels/mx.h`` (``ints[0]``)
ELEMENT_IDS = {"e2m3": 0, "e3m2": 1, "e4m3": 2, "e5m2": 3}
FAMILIES = ("mxfp6", "mxfp8")
#: from this many tokens on, calls take the prepare + dequantize + GEMM path (one thread, N = K = 2048: the direct
#: kernel was faster up to 8 tokens, the GEMM path from 16)
GEMM_MIN_TOKENS = 16
#: bytes of float32 weight dequantized per slice in the GEMM path
GEMM_SLICE_BYTES = 2 << 20


def params(scheme, k: int) -> tuple[int, ...]:
    """``ints`` of the MX kernels for ``scheme`` and an activation of ``k`` features."""
    return (ELEMENT_IDS[scheme.element], scheme.padded_in_features(k), int(scheme.activations))


def supports(scheme, x, packed) -> str | None:
    return launch.activation_reason(x)


def bind(scheme, x, packed, bias, n):
    """``launch(x, packed, bias)`` for one call signature: ``linear_mx`` up to ``GEMM_MIN_TOKENS - 1`` tokens, the
    prepare + dequantize + GEMM path beyond."""
    ints = params(scheme, x.shape[-1])

    def gemm(x, packed, bias):
        return prepare_dequantize_gemm(scheme, ints, x, packed, bias, n)

    return launch.bind_kernel(scheme, "linear_mx", x, packed, bias, n, ints, (), GEMM_MIN_TOKENS - 1, gemm)


def prepare_dequantize_gemm(scheme, ints, x, packed, bias, n: int) -> torch.Tensor:
    """Many tokens: the prepared activation ``[M, Kp]`` (C++) times slices of dequantized rows (C++), torch's GEMM."""
    k, kp = x.shape[-1], ints[1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    packed = [t.contiguous() for t in packed]
    xp = torch.empty((m, kp), dtype=torch.float32)
    call = launch.template("prepare_mx", k, n, len(packed), ints, (), x.dtype == torch.bfloat16)
    call.x, call.y, call.M, call.threads = x2.data_ptr(), xp.data_ptr(), m, torch.get_num_threads()
    launch.check(library.kernel("prepare_mx")(call), f"{scheme.name} prepare", m, k, n)
    rows = max(1, min(n, GEMM_SLICE_BYTES // (4 * kp)))
    return launch.sliced_gemm(scheme, x, xp, packed, bias, n, "dequant_mx", ints, (), (3, 4), rows)


def kernel_entries(family: str) -> list[KernelEntry]:
    """The family's CPU row (none without a C++ compiler; a warning says so once)."""
    if family not in FAMILIES or not cpp.available():
        return []
    return [KernelEntry(f"cpp-{family}", "cpu", (family,), supports, bind, cpp.PRIORITY)]
