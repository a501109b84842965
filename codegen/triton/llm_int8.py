"""Triton row of ``llm-int8`` (LLM.int8 as bitsandbytes runs it; :mod:`qcompile.schemes.llm_int8`).

Three kernels, each following the reference's operations (module docstring there), ``xh = fp16(x)``:

* ``outlier_columns_kernel`` (grid ``cdiv(K, BLOCK)``): ``columns int8 [K]``, 1 where ``|xh[m, k]| >= threshold``
  for some token ``m``;
* ``quantize_kernel`` (one program per token): ``r[m]`` = the largest ``|xh[m, k]|`` that is not an outlier,
  ``x_q int8 [M, K] = round_half_even(xh * step)`` with ``step = (1 / r[m]) * 127`` (torch computes the
  reference's ``127 / r`` so: a reciprocal, then a product), 0 in outlier columns, all 0 when ``r[m] = 0``; and
  ``row_scale float32 [M] = r[m] / 127``;
* ``llm_int8_linear_kernel`` (grid ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))``): the exact int32 sum
  ``x_q @ qweight.T`` (``tl.dot``, sm_80+) and, in K blocks that hold an outlier column, the float part
  ``x[:, cols] @ W_deq[:, cols].T`` with ``W_deq[n, k] = (qweight[n, k] * scales[n]) * (1 / 127)`` in float32
  (``x`` upcast to float32, fp32 ``tl.dot`` at ``ieee`` precision); then, as the reference,
  ``y = (float(acc) * (scales[n] * (1 / 127))) * row_scale[m] + outlier_part + bias[n]`` rounded once to
  ``x.dtype`` (by its bits: the interpreter's float32 -> bfloat16 cast truncates).

Calls without an outlier column equal the reference bit for bit; with one, the float part's sums run in another
order. Under ``TRITON_INTERPRET=1`` :func:`llm_int8_linear` runs on CPU tensors (the tests call it there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.codegen.triton import common
from qcompile.codegen.triton.peers import DTYPE_CODES, round_to
from qcompile.codegen.triton.w8a8 import round_half_even
from qcompile.codegen.triton.rows import cuda_call_reason, cuda_rows
from qcompile.runtime.dispatch import KernelEntry
from qcompile.schemes.llm_int8 import INV_127

PRIORITY = 10
BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32
COLUMN_BLOCK, QUANTIZE_BLOCK = 128, 1024


@triton.jit
def outlier_columns_kernel(x_ptr, columns_ptr, M, K, stride_xm, threshold, BLOCK: tl.constexpr):
    """``columns[k] = any_m |fp16(x[m, k])| >= threshold`` for one block of columns of ``x [M, K]``."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    found = tl.zeros((BLOCK,), dtype=tl.int32)
    for m in range(0, M):
        v = tl.load(x_ptr + m * stride_xm + offs, mask=mask, other=0.0).to(tl.float16).to(tl.float32)
        found = tl.maximum(found, (tl.abs(v) >= threshold).to(tl.int32))
    tl.store(columns_ptr + offs, found.to(tl.int8), mask=mask)


@triton.jit
def quantize_kernel(
    x_ptr, columns_ptr, q_ptr, row_scale_ptr, K, stride_xm, stride_qm, threshold, BLOCK: tl.constexpr,
):  # fmt: skip
    """Token ``m`` of ``x [M, K]`` → ``q int8 [M, K]`` and ``row_scale[m]`` (module docstring). Grid ``(M,)``."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    absmax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        v = tl.abs(tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float16).to(tl.float32))
        absmax = tl.maximum(absmax, tl.where(v >= threshold, 0.0, v))
    r = tl.max(absmax, axis=0)
    step = tl.where(r > 0.0, tl.math.div_rn(1.0, tl.where(r > 0.0, r, 1.0)) * 127.0, 0.0)  # torch's 127 / r
    tl.store(row_scale_ptr + row, tl.math.div_rn(r, 127.0))
    for k0 in range(0, K, BLOCK):
        mask = k0 + offs < K
        v = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float16).to(tl.float32)
        outlier = tl.load(columns_ptr + k0 + offs, mask=mask, other=0) != 0
        v = tl.where(tl.abs(v) >= threshold, 0.0, v)
        code = tl.where(outlier, 0.0, round_half_even(v * step))
        tl.store(q_ptr + row.to(tl.int64) * stride_qm + k0 + offs, code.to(tl.int8), mask=mask)


@triton.jit
def llm_int8_linear_kernel(
    x_ptr, xq_ptr, row_scale_ptr, columns_ptr, w_ptr, scales_ptr, bias_ptr, out_ptr, M, N, K,
    stride_xm, stride_qm, stride_wn, stride_om, inv_127,
    DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``out [M, N]`` of the module docstring. Blocks >= 16, ``BLOCK_K >= 32``."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    scale = tl.load(scales_ptr + offs_n, mask=mask_n, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    outside = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < K
        a = tl.load(xq_ptr + offs_m[:, None].to(tl.int64) * stride_qm + ks[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0)  # fmt: skip
        b = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + ks[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0)  # fmt: skip
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        outlier = tl.load(columns_ptr + ks, mask=mask_k, other=0) != 0
        if tl.max(outlier.to(tl.int32), axis=0) > 0:
            xf = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + ks[None, :],
                         mask=mask_m[:, None] & (mask_k & outlier)[None, :], other=0.0).to(tl.float32)  # fmt: skip
            wf = (b.to(tl.float32) * scale[None, :]) * inv_127
            wf = tl.where(outlier[:, None], wf, 0.0)
            outside = tl.dot(xf, wf, outside, input_precision="ieee")
    row_scale = tl.load(row_scale_ptr + offs_m, mask=mask_m, other=0.0)
    y = (acc.to(tl.float32) * (scale * inv_127)[None, :]) * row_scale[:, None] + outside
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = round_to(y, DTYPE)
    out = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# -- launcher and row -----------------------------------------------------------------------------------------------
def llm_int8_linear(scheme, x: torch.Tensor, packed, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """``qcompile::linear`` of ``llm-int8``: ``x [..., K]`` float32 / bfloat16 / float16, ``y`` in ``x.dtype``;
    ``packed`` = ``[qweight int8 [N, K], scales float32 [N]]``."""
    if x.dtype not in DTYPE_CODES:
        raise ValueError(f"llm_int8_linear: activations must be float16, bfloat16 or float32, got {x.dtype}")
    k = x.shape[-1]
    qweight, scales = packed[0].contiguous(), packed[1].reshape(-1).contiguous()
    if tuple(qweight.shape) != (out_features, k) or qweight.dtype != torch.int8:
        raise ValueError(f"llm_int8_linear: qweight must be int8 [{out_features}, {k}], got {qweight.dtype} "
                         f"{list(qweight.shape)}")  # fmt: skip
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty((m, out_features), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], out_features)
    threshold = float(scheme.threshold)
    columns = torch.empty((k,), dtype=torch.int8, device=x.device)
    common.kernel(outlier_columns_kernel)[(common.cdiv(k, COLUMN_BLOCK),)](
        x2, columns, m, k, x2.stride(0), threshold, BLOCK=COLUMN_BLOCK)
    x_q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    row_scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    common.kernel(quantize_kernel)[(m,)](
        x2, columns, x_q, row_scale, k, x2.stride(0), x_q.stride(0), threshold,
        BLOCK=min(QUANTIZE_BLOCK, common.next_power_of_2(k)),
    )  # fmt: skip
    grid = (common.cdiv(m, BLOCK_M), common.cdiv(out_features, BLOCK_N))
    common.kernel(llm_int8_linear_kernel)[grid](
        x2, x_q, row_scale, columns, qweight, scales, y if bias is None else bias, y, m, out_features, k,
        x2.stride(0), x_q.stride(0), qweight.stride(0), y.stride(0), INV_127, DTYPE=DTYPE_CODES[x.dtype],
        HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], out_features)


def supports(scheme, x, packed) -> str | None:
    return cuda_call_reason(x, (), needs="int8 tl.dot needs compute capability {}+")


def bind(scheme, x, packed, bias, out_features):
    def launch(x, packed, bias):
        return llm_int8_linear(scheme, x, packed, bias, out_features)

    return launch


def kernel_entries(family: str) -> list[KernelEntry]:
    """The CUDA row of ``llm-int8`` (none when triton cannot be imported)."""
    return cuda_rows(family, "llm-int8", "triton-llm-int8", supports, bind, PRIORITY)
