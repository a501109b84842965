"""Triton rows of the peer families (``quanto``, ``torchao``, ``eetq``; :mod:`qcompile.schemes.peers`).

* Schemes that keep another family's layout for the call's activation dtype (weight-only forms; torchao
  ``fp8-a8`` with float32 activations, whose numbers are ``fp8-w8a8``'s) are served by that family's CUDA rows
  (:mod:`qcompile.codegen.layout_rows`).
* quanto ``-a8`` and torchao ``int8-a8`` run the two kernels here, which follow the reference
  (``qcompile.schemes.quanto`` / ``torchao``) operation by operation, rounding to the activation dtype where it
  rounds: ``quantize_kernel`` (one program per token) writes ``x_q int8 [M, K]`` and the token's scale
  ``float32 [M]``; ``a8_linear_kernel`` multiplies ``x_q`` by ``qweight int8 [N, K]`` with exact int32 sums
  (``tl.dot``, sm_80+) and applies the peer's epilogue with ``scales float32 [N]``::

      mode 0, quanto:  s = R(input_scale); x_q = clamp(rint(R(x / s)), -128, 127)
                       y = R(float(acc) * R(s * R(scale[n]))), then R(y + R(bias[n]))
      mode 1, torchao: s_m = max(R(absmax(x[m]) / 127.5), 2**-23); x_q = clamp(rint(x * (1 / s_m)), -128, 127)
                       y = R(R(float(acc) * s_m) * scale[n] + R(bias[n]))

``R`` rounds to the activation dtype, half to even (bfloat16 by its bits: the interpreter's float32 -> bfloat16
cast truncates). Under ``TRITON_INTERPRET=1`` :func:`a8_linear` runs on CPU tensors (the tests call it there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.codegen import layout_rows
from qcompile.codegen.triton import common
from qcompile.codegen.triton.w8a8 import round_half_even
from qcompile.runtime.dispatch import KernelEntry

PRIORITY = 10
MODES = {"static-int8": 0, "token-int8": 1}
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
INT8_EPS: tl.constexpr = 2.0**-23  # torchao's clamp of the int8 scale (float32 eps)
BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32
QUANTIZE_BLOCK = 1024


@triton.jit
def round_to(v, DTYPE: tl.constexpr):
    """``v`` (fp32) rounded to fp32 (DTYPE 0), bfloat16 (1) or float16 (2), half to even, kept in fp32."""
    if DTYPE == 1:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        v = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    elif DTYPE == 2:
        v = v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def quantize_kernel(
    x_ptr, q_ptr, scale_ptr, input_scale_ptr, K, stride_xm, stride_qm,
    MODE: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Row ``m`` of ``x [M, K]`` → ``q int8 [M, K]`` and ``scale[m]`` (mode 0: the static scale). Grid ``(M,)``."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    if MODE == 0:
        scale = round_to(tl.load(input_scale_ptr).to(tl.float32), DTYPE)
    else:
        absmax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            v = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            absmax = tl.maximum(absmax, tl.abs(v))
        scale = tl.maximum(round_to(tl.math.div_rn(tl.max(absmax, axis=0), 127.5), DTYPE), INT8_EPS)
    tl.store(scale_ptr + row, scale)
    inverse = tl.math.div_rn(1.0, scale)
    for k0 in range(0, K, BLOCK):
        mask = k0 + offs < K
        v = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        if MODE == 0:
            v = round_to(tl.math.div_rn(v, scale), DTYPE)
        else:
            v = v * inverse
        v = tl.minimum(tl.maximum(round_half_even(v), -128.0), 127.0)
        tl.store(q_ptr + row.to(tl.int64) * stride_qm + k0 + offs, v.to(tl.int8), mask=mask)


@triton.jit
def a8_linear_kernel(
    xq_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    MODE: tl.constexpr, DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``out [M, N] = epilogue(xq [M, K] @ w [N, K].T)`` (module docstring). Grid ``(cdiv(M, BLOCK_M),
    cdiv(N, BLOCK_N))``; blocks >= 16, ``BLOCK_K >= 32``."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        a = tl.load(xq_ptr + offs_m[:, None].to(tl.int64) * stride_xm + ks[None, :],
                    mask=mask_m[:, None] & (ks[None, :] < K), other=0)  # fmt: skip
        b = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + ks[:, None],
                    mask=(ks[:, None] < K) & mask_n[None, :], other=0)  # fmt: skip
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    total = acc.to(tl.float32)
    x_scale = tl.load(xs_ptr + offs_m, mask=mask_m, other=1.0)
    w_scale = tl.load(ws_ptr + offs_n, mask=mask_n, other=1.0)
    bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_BIAS:
        bias = round_to(tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32), DTYPE)
    if MODE == 0:
        out_scale = round_to(x_scale[:, None] * round_to(w_scale[None, :], DTYPE), DTYPE)
        y = round_to(total * out_scale, DTYPE)
        if HAS_BIAS:
            y = round_to(y + bias[None, :], DTYPE)
    else:
        y = round_to(total * x_scale[:, None], DTYPE) * w_scale[None, :]
        if HAS_BIAS:
            y = y + bias[None, :]
        y = round_to(y, DTYPE)
    out = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# -- launcher and rows ----------------------------------------------------------------------------------------------
def a8_linear(scheme, x: torch.Tensor, packed, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """``qcompile::linear`` of a quanto ``-a8`` or torchao ``int8-a8`` scheme: ``x [..., K]`` in ``x.dtype``."""
    mode, dtype = MODES[scheme.activation_mode], DTYPE_CODES[x.dtype]
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    qweight, scales = packed[0].contiguous(), packed[1].reshape(-1).contiguous()
    input_scale = packed[2] if mode == 0 else scales  # mode 1 does not read it
    y = torch.empty((m, out_features), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], out_features)
    x_q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    x_scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    common.kernel(quantize_kernel)[(m,)](
        x2, x_q, x_scale, input_scale, k, x2.stride(0), x_q.stride(0), MODE=mode, DTYPE=dtype,
        BLOCK=min(QUANTIZE_BLOCK, common.next_power_of_2(k)),
    )  # fmt: skip
    grid = (common.cdiv(m, BLOCK_M), common.cdiv(out_features, BLOCK_N))
    common.kernel(a8_linear_kernel)[grid](
        x_q, x_scale, qweight, scales, y if bias is None else bias, y, m, out_features, k, x_q.stride(0),
        qweight.stride(0), y.stride(0), MODE=mode, DTYPE=dtype, HAS_BIAS=bias is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], out_features)


def _a8_supports(scheme, x, packed) -> str | None:
    mode = getattr(scheme, "activation_mode", None)
    if mode not in MODES:
        return f"the int8-activation kernel takes int8 activations, {scheme.name} has {mode or 'none (weight-only)'}"
    if x.device.type != "cuda":
        return f"needs a CUDA tensor, got {x.device.type}"
    if x.dtype not in DTYPE_CODES:
        return f"activations must be float16, bfloat16 or float32, got {x.dtype}"
    capability = common.device_capability(x.device)
    if capability < (8, 0):
        return f"int8 tl.dot needs compute capability 8.0+, the device has {capability[0]}.{capability[1]}"
    return None


def _a8_bind(scheme, x, packed, bias, out_features):
    def launch(x, packed, bias):
        return a8_linear(scheme, x, packed, bias, out_features)

    return launch


def kernel_entries(family: str) -> list[KernelEntry]:
    """The CUDA rows of ``family`` (none when triton cannot be imported)."""
    if common.triton_missing() is not None:
        return []
    own = KernelEntry(f"triton-{family}-a8", "cuda", (family,), _a8_supports, _a8_bind, PRIORITY)
    return [*layout_rows.delegated_entries(family, "cuda"), own]
