"""C++ kernel rows for the integer families: W8A16 / W4A16 (``int-weight-only``), W8A8 (``w8a8-int8``) and W4A8
(``w4a8-int``). Kernels in ``kernels/weight_only.h`` (``_bf16.h``, ``_dequant.h``), ``kernels/w8a8.h``, ``kernels/w4a8.h``.

Each row is a ``supports`` predicate (``None`` when the kernel serves the call, else the reason) and a ``bind``
that returns a launcher for one call signature (and hands the C++ op its plan). Calls of many tokens (from
:func:`gemm_path.min_tokens` on) dequantize the weight in slices and use torch's GEMM in the activation's dtype.
"""

from __future__ import annotations

import dataclasses

import torch

from qcompile.codegen import cpp
from qcompile.codegen.cpp import gemm_path, launch, library
from qcompile.runtime.dispatch import KernelEntry

#: bytes of dequantized weight per slice in the GEMM path: few, large GEMMs (oneDNN packs its operands per call)
#: whose slice stays in the last-level cache
GEMM_SLICE_BYTES = 8 << 20


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
    return launch.bind_kernel(scheme, weight_only_kernel(scheme, x), x, packed, bias, n, ints, floats,
                              gemm_path.min_tokens("weight-only", x.dtype) - 1, slices=_slices(scheme, x))


def _slices(scheme, x) -> launch.Slices:
    """The GEMM path of a weight-only call: ``dequant_wo`` slices of :data:`GEMM_SLICE_BYTES`."""
    k = x.shape[-1]
    ints, floats = _weight_only_params(scheme, k)
    rows = max(1, GEMM_SLICE_BYTES // (x.element_size() * k))
    return launch.Slices("dequant_wo", (*ints, 0, 0), floats, (3, 4), rows)


def weight_only_kernel(scheme, x) -> str:
    """``linear_wo_bf16`` (bfloat16 dot products, vdpbf16ps) for int4 with bfloat16 activations and groups of a
    multiple of 64 where the CPU has AVX512-BF16 and the avx512 variant runs; ``linear_wo`` otherwise."""
    group = scheme.group_size_for(x.shape[-1])
    if (scheme.bits == 4 and x.dtype == torch.bfloat16 and group % 64 == 0 and library.active_isa() == "avx512"
            and library.cpu_supports("avx512bf16")):  # fmt: skip
        return "linear_wo_bf16"
    return "linear_wo"


# -- W8A8 and W4A8 -----------------------------------------------------------------------------------------
def w8a8_bind(scheme, x, packed, bias, n):
    """W8A8: per-token dynamic int8 activations × int8 weights, exact int32 sums (see ``w8a8.h``); many tokens go
    to torch's int8 GEMM (:func:`int8_gemm`), which gives the same int32 sums."""

    def gemm(x, packed, bias):
        return int8_gemm(x, packed, bias, n)

    limit = gemm_path.min_tokens("w8a8", x.dtype) - 1
    return launch.bind_kernel(scheme, "linear_w8a8", x, packed, bias, n, max_tokens=limit, slow=gemm)


def int8_gemm(x, packed, bias, n: int) -> torch.Tensor:
    """Many tokens of W8A8: activations quantized per token as the kernel does (``quantize_tokens``), ``torch._int_mm``
    (oneDNN: AMX-INT8 or VNNI) for the exact int32 sums, then the kernel's epilogue in the same order
    (``w8a8_epilogue``): the direct kernel's results, bit for bit."""
    k = x.shape[-1]
    x_q, x_scale = launch.quantize_tokens_int8(x.reshape(-1, k).contiguous())
    acc = torch._int_mm(x_q, packed[0].t())
    m = acc.shape[0]
    y = torch.empty((m, n), dtype=x.dtype)
    call = launch.template("w8a8_epilogue", k, n, 2, bf16=x.dtype == torch.bfloat16)
    bias, scales = launch.bias32(bias), packed[1].contiguous()
    call.x, call.y, call.M, call.threads = acc.data_ptr(), y.data_ptr(), m, torch.get_num_threads()
    call.tensors[0], call.tensors[1] = x_scale.data_ptr(), scales.data_ptr()
    call.bias = None if bias is None else bias.data_ptr()
    launch.check(library.kernel("w8a8_epilogue")(call), "w8a8_epilogue", m, k, n)
    return y.reshape(*x.shape[:-1], n)


def w4a8_bind(scheme, x, packed, bias, n):
    """W4A8: per-token dynamic int8 activations × int4 group-wise weights, exact int32 sums (see ``w4a8.h``); many
    tokens take :func:`w4a8_slices` (in the C++ op)."""
    k = x.shape[-1]
    ints = (scheme.padded_in_features(k), scheme.group_size_for(k))
    limit = gemm_path.min_tokens("w4a8", x.dtype) - 1
    return launch.bind_kernel(scheme, "linear_w4a8", x, packed, bias, n, ints, (8.0,), limit,
                              slices=w4a8_slices(scheme, x))


def w4a8_slices(scheme, x) -> launch.Slices:
    """Many tokens of W4A8: the activations quantized per token (the kernel's codes and scales) and taken back to
    ``code * token scale`` in the activation's dtype (``quantize_tokens``), the weight dequantized in slices to
    ``(u - zero) * scale`` in that dtype, and torch's GEMM with the bias inside. The group scales sit inside the
    weight, so an integer GEMM cannot take them: this path's sums are float (for bfloat16, each weight and each
    scaled activation rounded once; the codes are exact)."""
    return dataclasses.replace(_slices(scheme.weights, x), prologue="quantize_tokens")


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
