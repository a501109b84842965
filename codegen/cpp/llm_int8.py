"""C++ kernel row ``cpp-llm-int8`` for ``llm-int8`` (LLM.int8 as bitsandbytes runs it): the int8 part on the W8A8
kernel of ``kernels/w8a8.h``, the outlier columns with torch.

Per call (``qcompile.schemes.llm_int8``): torch finds the outlier columns and quantizes the rest of the activation
to int8 codes per token (``split_activations``). The W8A8 kernel takes those codes as float32 values: a row whose
largest code is 127 has the kernel's own scale 1, so it reproduces the codes exactly and returns ``float(sum x_q q)
* scales[n] / 127``, which torch multiplies by the token's ``r / 127`` (the reference's operations, in its order).
A row whose largest kept element sits in an outlier column has smaller codes; a call with one takes torch's exact
int8 matmul instead. The outlier columns are ``x[:, cols] @ W_deq[:, cols].T`` in float32. The C++ op does not
serve these calls (the outlier split is per call), so every call runs this launcher.
"""

from __future__ import annotations

import ctypes

import torch

from qcompile.codegen import cpp
from qcompile.codegen.cpp import launch, library
from qcompile.runtime.dispatch import KernelEntry
from qcompile.schemes.llm_int8 import Int8Rows, split_activations
from qcompile.schemes.w8a8 import int8_matmul_exact

KERNEL = "linear_w8a8"


def supports(scheme, x, packed) -> str | None:
    return launch.activation_reason(x)


def int8_part(codes: torch.Tensor, qweight: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """float32 ``[M, N]``: ``float(codes @ qweight.T) * step[n]`` (exact integer sums), on the W8A8 kernel when every
    row's largest code is 127 (or the row is 0), else with torch's int8 matmul."""
    m, k = codes.shape
    n = qweight.shape[0]
    peak = codes.abs().amax(1)
    if not bool(((peak == 127) | (peak == 0)).all()):
        return int8_matmul_exact(codes, qweight) * step.unsqueeze(0)
    values = codes.to(torch.float32)
    y = torch.empty((m, n), dtype=torch.float32)
    call = launch.template(KERNEL, k, n, 2)
    call.x, call.y, call.M, call.threads = values.data_ptr(), y.data_ptr(), m, torch.get_num_threads()
    call.tensors[0], call.tensors[1] = qweight.data_ptr(), step.data_ptr()
    launch.check(library.kernel(KERNEL)(ctypes.byref(call)), KERNEL, m, k, n)
    return y


def bind(scheme, x, packed, bias, n):
    """``launch(x, packed, bias) -> y`` (``x [..., K]`` float32 or bfloat16, ``y`` in ``x.dtype``)."""
    k = x.shape[-1]

    def run(x, packed, bias):
        x2 = x.reshape(-1, k)
        if x2.shape[0] == 0:
            return x.new_empty((*x.shape[:-1], n))
        qweight, scales = packed[0].contiguous(), packed[1].contiguous()
        codes, row_scale, columns = split_activations(x2, scheme.threshold)
        y = int8_part(codes, qweight, scales * (1.0 / 127.0)) * row_scale.unsqueeze(1)
        if bool(columns.any()):
            index = columns.nonzero().squeeze(1)
            w = scheme.dequantize(Int8Rows(qweight.index_select(1, index), scales))
            y = y + x2.index_select(1, index).to(torch.float32) @ w.t()
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y.to(x.dtype).reshape(*x.shape[:-1], n)

    return run


def kernel_entries(family: str) -> list[KernelEntry]:
    """The llm-int8 row (none without a C++ compiler; a warning says so once)."""
    if family != "llm-int8" or not cpp.available():
        return []
    return [KernelEntry("cpp-llm-int8", "cpu", (family,), supports, bind, cpp.PRIORITY)]
