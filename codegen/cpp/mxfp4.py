"""C++ kernel rows for the FP4 families (``kernels/fp4.h``): ``cpp-mxfp4`` here, ``cpp-nvfp4`` in :mod:`.nvfp4`.

One kernel serves both, told the scale kind by its parameters (``ints``: kind, Kp, group, rotation, w4a4): the
activation is zero-padded, rotated by the block Hadamard and, with ``-w4a4``, quantized per token inside the kernel,
so the C++ op can serve decode calls with no Python in between. Calls of many tokens prepare the activation once
(``prepare_fp4``), dequantize the weight in slices of rows (``dequant_fp4``, float32, the rotated basis) and use
torch's float GEMM.
"""

from __future__ import annotations

import torch

from qcompile.codegen import cpp
from qcompile.codegen.cpp import launch, library
from qcompile.runtime.dispatch import KernelEntry

#: the scale kinds of ``kernels/fp4.h``
KIND_E8M0 = 0
KIND_E4M3 = 1
#: from this many tokens on, calls take the prepare + dequantize + GEMM path
GEMM_MIN_TOKENS = 256
#: bytes of float32 weight dequantized per slice in the GEMM path
GEMM_SLICE_BYTES = 2 << 20


def params(scheme, kind: int, k: int) -> tuple[int, ...]:
    """``ints`` of the FP4 kernels for ``scheme`` and an activation of ``k`` features."""
    return (kind, scheme.padded_in_features(k), scheme.group_size, scheme.rotation or 0, int(scheme.activations))


def supports(scheme, x, packed) -> str | None:
    return launch.activation_reason(x)


def binder(kind: int):
    """``bind(scheme, x, packed, bias, n)`` for the FP4 kernel with scale kind ``kind``."""

    def bind(scheme, x, packed, bias, n):
        ints = params(scheme, kind, x.shape[-1])

        def gemm(x, packed, bias):
            return prepare_dequantize_gemm(scheme, ints, x, packed, bias, n)

        return launch.bind_kernel(scheme, "linear_fp4", x, packed, bias, n, ints, (), GEMM_MIN_TOKENS - 1, gemm)

    return bind


def prepare_dequantize_gemm(scheme, ints, x, packed, bias, n: int) -> torch.Tensor:
    """Many tokens: the prepared activation ``[M, Kp]`` (C++) times slices of dequantized rows (C++), torch's GEMM."""
    k, kp = x.shape[-1], ints[1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    packed = [t.contiguous() for t in packed]
    threads = torch.get_num_threads()
    xp = torch.empty((m, kp), dtype=torch.float32)
    call = launch.template("prepare_fp4", k, n, len(packed), ints, (), x.dtype == torch.bfloat16)
    call.x, call.y, call.M, call.threads = x2.data_ptr(), xp.data_ptr(), m, threads
    launch.check(library.kernel("prepare_fp4")(call), f"{scheme.name} prepare", m, k, n)

    rows = max(1, min(n, GEMM_SLICE_BYTES // (4 * kp)))
    return launch.sliced_gemm(scheme, x, xp, packed, bias, n, "dequant_fp4", ints, (), (5, 6), rows)


def rows(family: str, name: str, kind: int) -> list[KernelEntry]:
    """The FP4 row ``name`` for ``family`` (none without a C++ compiler; a warning says so once)."""
    if not cpp.available():
        return []
    return [KernelEntry(name, "cpu", (family,), supports, binder(kind), cpp.PRIORITY)]


def kernel_entries(family: str) -> list[KernelEntry]:
    return rows(family, "cpp-mxfp4", KIND_E8M0) if family == "mxfp4" else []
