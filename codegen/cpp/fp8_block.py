"""C++ kernel row for the ``fp8-block`` family (``fp8-block``, ``fp8-block-ue8m0``); kernel in ``kernels/fp8_block.h``.

Decode-sized calls (up to ``GEMM_MIN_TOKENS - 1`` tokens) run ``linear_fp8_block``: activations quantized per token
and group of 128, e4m3 weight codes decoded once per block and shared by every token. Larger calls quantize the
activations with the same code (``fake_quant_fp8_block``: ``float(xq) * s``), dequantize the weight in slices of
whole 128-row blocks (``dequant_fp8_block``) and use torch's float32 GEMM: the same formula, rounded differently.
"""

from __future__ import annotations

import torch

from qcompile.codegen import cpp
from qcompile.codegen.cpp import launch, library
from qcompile.runtime.dispatch import KernelEntry
from qcompile.schemes.fp8_block import BLOCK, cdiv

#: from this many tokens on, calls dequantize and use torch's float32 GEMM (single thread, N = K = 2048: the
#: direct kernel was faster at 1-8 tokens, the GEMM path from 16)
GEMM_MIN_TOKENS = 16
#: bytes of float32 weight dequantized per slice in the GEMM path
GEMM_SLICE_BYTES = 4 << 20


def supports(scheme, x, packed) -> str | None:
    return launch.activation_reason(x)


def bind(scheme, x, packed, bias, n):
    """Launcher for one call signature (see the module docstring); ``ints[0]`` is the ue8m0 flag of the kernel."""

    def gemm(x, packed, bias):
        return dequantize_gemm(scheme, x, packed, bias, n)

    return launch.bind_kernel(scheme, "linear_fp8_block", x, packed, bias, n, (int(scheme.ue8m0),), (),
                              GEMM_MIN_TOKENS - 1, gemm)  # fmt: skip


def dequantize_gemm(scheme, x, packed, bias, n: int) -> torch.Tensor:
    """Many tokens: ``(float(xq) * s) @ (float(q) * scales).T``, both operands made float32 by the C++ helpers
    (``fake_quant_fp8_block``, ``dequant_fp8_block`` in slices of whole 128-row blocks), then torch's GEMM."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    packed = [t.contiguous() for t in packed]
    threads = torch.get_num_threads()
    xd = torch.empty((m, k), dtype=torch.float32)
    call = launch.template("fake_quant_fp8_block", k, n, len(packed), (int(scheme.ue8m0),), (),
                           x2.dtype == torch.bfloat16)  # fmt: skip
    call.x, call.y, call.M, call.y_bf16, call.threads = x2.data_ptr(), xd.data_ptr(), m, 0, threads
    launch.check(library.kernel("fake_quant_fp8_block")(call), f"{scheme.name} activations", m, k, n)
    rows = min(cdiv(n, BLOCK) * BLOCK, max(BLOCK, GEMM_SLICE_BYTES // (4 * k) // BLOCK * BLOCK))
    return launch.sliced_gemm(scheme, x, xd, packed, bias, n, "dequant_fp8_block", slots=(1, 2), rows=rows)


def kernel_entries(family: str) -> list[KernelEntry]:
    """The family's CPU row (none without a C++ compiler; a warning says so once)."""
    if family != "fp8-block" or not cpp.available():
        return []
    return [KernelEntry("cpp-fp8-block", "cpu", (family,), supports, bind, cpp.PRIORITY)]
