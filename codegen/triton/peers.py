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

* torchao ``fp8-a8`` with bfloat16 or float16 activations runs ``fp8_quantize_kernel`` (one program per token:
  ``x_q float8_e4m3fn [M, K]``, ``x_scale float32 [M]``) and ``fp8_a8_linear_kernel`` (e4m3 ``tl.dot`` with fp32
  sums, sm_89+; under the interpreter the tiles are upcast to fp32 first)::

      s_m = R(absmax(x[m]) / 448), 1 when 0;  x_q = e4m3(clamp(float32(x) / s_m, -448, 448))
      y   = R((float32(sum_k x_q * q) * s_m) * scale[n] + R(bias[n]))

  (float32 activations: ``fp8-w8a8``'s numbers, served by that family's row). The products of e4m3 values are exact;
  only the order of the float32 sums differs from the reference.

* quanto's 2-bit grids (weight-only) run ``int2_linear_kernel``: ``qweight uint8 [N, Kp / 4]`` (element ``4j + i``
  in bits ``2i .. 2i+1`` of byte ``j``), ``scales`` / ``zeros float32 [N, Kp / G]``; each weight decoded as the
  reference decodes it (``P`` rounds to the peer's dtype)::

      shift = P(zeros * scale);  float32 activations: w = scale * u - shift;  16-bit: w = R(P(P(scale * u) - shift))
      y = R(sum_k x * w + R(bias[n]))       (float32 sums; fp32 dots at ``ieee`` precision)

``R`` rounds to the activation dtype, half to even (bfloat16 by its bits: the interpreter's float32 -> bfloat16
cast truncates). Under ``TRITON_INTERPRET=1`` :func:`a8_linear` and :func:`fp8_a8_linear` run on CPU tensors (the
tests call them there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.codegen import layout_rows
from qcompile.codegen.triton import common
from qcompile.codegen.triton.w8a8 import E4M3_MAX, round_half_even, round_to_e4m3_grid
from qcompile.codegen.triton.rows import cuda_call_reason, cuda_rows
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


@triton.jit
def fp8_quantize_kernel(
    x_ptr, q_ptr, scale_ptr, K, stride_xm, stride_qm,
    DTYPE: tl.constexpr, ROUND_IN_FP32: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Row ``m`` of ``x [M, K]`` → ``q float8_e4m3fn [M, K]`` and ``scale[m]`` (torchao's rule, module docstring);
    ``ROUND_IN_FP32``: round to the e4m3 grid in fp32 before the cast (the interpreter's cast rounds wrongly when
    the mantissa carries). Grid ``(M,)``."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    absmax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        v = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.abs(v))
    scale = round_to(tl.math.div_rn(tl.max(absmax, axis=0), E4M3_MAX), DTYPE)
    scale = tl.where(scale > 0.0, scale, 1.0)
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        mask = k0 + offs < K
        v = tl.math.div_rn(tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32), scale)
        v = tl.minimum(tl.maximum(v, -E4M3_MAX), E4M3_MAX)
        if ROUND_IN_FP32:
            v = round_to_e4m3_grid(v)
        tl.store(q_ptr + row.to(tl.int64) * stride_qm + k0 + offs, v.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fp8_a8_linear_kernel(
    xq_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``out [M, N] = R((float32(xq [M, K] @ w [N, K].T) * xs[m]) * ws[n] + R(bias[n]))``, both operands e4m3;
    ``UPCAST``: fp32 dot of the upcast tiles (the interpreter). Grid ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))``;
    blocks >= 16, ``BLOCK_K >= 32``."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        a = tl.load(xq_ptr + offs_m[:, None].to(tl.int64) * stride_xm + ks[None, :],
                    mask=mask_m[:, None] & (ks[None, :] < K), other=0.0)  # fmt: skip
        b = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + ks[:, None],
                    mask=(ks[:, None] < K) & mask_n[None, :], other=0.0)  # fmt: skip
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, out_dtype=tl.float32)
    x_scale = tl.load(xs_ptr + offs_m, mask=mask_m, other=1.0)
    w_scale = tl.load(ws_ptr + offs_n, mask=mask_n, other=1.0)
    y = (acc * x_scale[:, None]) * w_scale[None, :]
    if HAS_BIAS:
        y = y + round_to(tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32), DTYPE)[None, :]
    y = round_to(y, DTYPE)
    out = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def int2_linear_kernel(
    x_ptr, w_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, M, N, K, GROUPS, stride_xm, stride_wn, stride_om,
    GROUP: tl.constexpr, DTYPE: tl.constexpr, PEER: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``out [M, N]`` of quanto's 2-bit weight-only linear (module docstring); ``DOT`` the tile dtype of ``tl.dot``.
    Grid ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))``; blocks >= 16."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + ks[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
        mask_w = mask_k[:, None] & mask_n[None, :]
        byte = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + (ks // 4)[:, None], mask=mask_w, other=0)
        u = ((byte.to(tl.int32) >> (2 * (ks % 4))[:, None]) & 3).to(tl.float32)
        group = offs_n[None, :].to(tl.int64) * GROUPS + (ks // GROUP)[:, None]
        scale = tl.load(scales_ptr + group, mask=mask_w, other=0.0)
        shift = round_to(tl.load(zeros_ptr + group, mask=mask_w, other=0.0) * scale, PEER)
        if DTYPE == 0:
            w = scale * u - shift
        else:
            w = round_to(round_to(round_to(scale * u, PEER) - shift, PEER), DTYPE)
        w = tl.where(mask_w, w, 0.0)
        if DOT == tl.float32:
            acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x.to(DOT), w.to(DOT), acc)
    y = acc
    if HAS_BIAS:
        y = y + round_to(tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32), DTYPE)[None, :]
    y = round_to(y, DTYPE)
    out = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# -- launchers and rows ----------------------------------------------------------------------------------------------
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


def fp8_a8_linear(scheme, x: torch.Tensor, packed, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """``qcompile::linear`` of torchao ``fp8-a8``: ``x [..., K]`` (bfloat16, float16; float32 gives the same
    numbers as ``fp8-w8a8``) in ``x.dtype``; ``packed`` = ``[qweight float8_e4m3fn [N, K], scales float32 [N, 1]]``."""
    if x.dtype not in DTYPE_CODES:
        raise ValueError(f"fp8_a8_linear: activations must be float16, bfloat16 or float32, got {x.dtype}")
    k = x.shape[-1]
    qweight, scales = packed[0].contiguous(), packed[1].reshape(-1).contiguous()
    if tuple(qweight.shape) != (out_features, k) or qweight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_a8_linear: qweight must be float8_e4m3fn [{out_features}, {k}], got {qweight.dtype} "
                         f"{list(qweight.shape)}")  # fmt: skip
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty((m, out_features), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], out_features)
    x_q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    x_scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    dtype, interpreting = DTYPE_CODES[x.dtype], common.interpreting()
    common.kernel(fp8_quantize_kernel)[(m,)](
        x2, x_q, x_scale, k, x2.stride(0), x_q.stride(0), DTYPE=dtype, ROUND_IN_FP32=interpreting,
        BLOCK=min(QUANTIZE_BLOCK, common.next_power_of_2(k)),
    )  # fmt: skip
    grid = (common.cdiv(m, BLOCK_M), common.cdiv(out_features, BLOCK_N))
    common.kernel(fp8_a8_linear_kernel)[grid](
        x_q, x_scale, qweight, scales, y if bias is None else bias, y, m, out_features, k, x_q.stride(0),
        qweight.stride(0), y.stride(0), DTYPE=dtype, HAS_BIAS=bias is not None, UPCAST=interpreting,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], out_features)


PEER_CODES = {"fp32": 0, "bf16": 1, "fp16": 2}


def int2_linear(scheme, x: torch.Tensor, packed, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """``qcompile::linear`` of a weight-only quanto 2-bit scheme: ``x [..., K]`` float32 / bfloat16 / float16, ``y``
    in ``x.dtype``; ``packed`` = ``[qweight uint8 [N, Kp / 4], scales, zeros float32 [N, Kp / G]]``."""
    if x.dtype not in DTYPE_CODES:
        raise ValueError(f"int2_linear: activations must be float16, bfloat16 or float32, got {x.dtype}")
    k = x.shape[-1]
    kp, group = scheme.padded_in_features(k), scheme.group_size_for(k)
    qweight, scales, zeros = (t.contiguous() for t in packed[:3])
    if tuple(qweight.shape) != (out_features, kp // 4) or qweight.dtype != torch.uint8:
        raise ValueError(f"int2_linear: qweight must be uint8 [{out_features}, {kp // 4}], got {qweight.dtype} "
                         f"{list(qweight.shape)}")  # fmt: skip
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty((m, out_features), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], out_features)
    grid = (common.cdiv(m, BLOCK_M), common.cdiv(out_features, BLOCK_N))
    common.kernel(int2_linear_kernel)[grid](
        x2, qweight, scales, zeros, y if bias is None else bias, y, m, out_features, k, kp // group, x2.stride(0),
        qweight.stride(0), y.stride(0), GROUP=group, DTYPE=DTYPE_CODES[x.dtype], PEER=PEER_CODES[scheme.dtype],
        HAS_BIAS=bias is not None, DOT=common.dot_dtype(x.dtype), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], out_features)


def _int2_supports(scheme, x, packed) -> str | None:
    if getattr(scheme, "weights", None) != "int2" or scheme.quantizes_activations:
        return f"the 2-bit kernel takes weight-only quanto int2 schemes, not {scheme.name}"
    return cuda_call_reason(x, (), capability=None)


def _int2_bind(scheme, x, packed, bias, out_features):
    def launch(x, packed, bias):
        return int2_linear(scheme, x, packed, bias, out_features)

    return launch


def _fp8_a8_supports(scheme, x, packed) -> str | None:
    mode = getattr(scheme, "activation_mode", None)
    if mode != "token-fp8":
        return f"the fp8-activation kernel takes torchao fp8-a8, {scheme.name} has {mode or 'none (weight-only)'}"
    if x.device.type == "cuda" and x.dtype not in (torch.bfloat16, torch.float16):  # float32 has its own reason
        return f"takes bfloat16 or float16 activations (float32 ones run fp8-w8a8's row), got {x.dtype}"
    return cuda_call_reason(x, (), (8, 9), needs="float8 tl.dot needs compute capability {}+")


def _fp8_a8_bind(scheme, x, packed, bias, out_features):
    def launch(x, packed, bias):
        return fp8_a8_linear(scheme, x, packed, bias, out_features)

    return launch


def _a8_supports(scheme, x, packed) -> str | None:
    mode = getattr(scheme, "activation_mode", None)
    if mode not in MODES:
        return f"the int8-activation kernel takes int8 activations, {scheme.name} has {mode or 'none (weight-only)'}"
    return cuda_call_reason(x, (), needs="int8 tl.dot needs compute capability {}+")


def _a8_bind(scheme, x, packed, bias, out_features):
    def launch(x, packed, bias):
        return a8_linear(scheme, x, packed, bias, out_features)

    return launch


def kernel_entries(family: str) -> list[KernelEntry]:
    """The CUDA rows of ``family`` (none when triton cannot be imported)."""
    if common.triton_missing() is not None:
        return []
    return [
        *layout_rows.delegated_entries(family, "cuda"),
        *cuda_rows(family, family, f"triton-{family}-a8", _a8_supports, _a8_bind, PRIORITY),
        *cuda_rows(family, "torchao", "triton-torchao-fp8-a8", _fp8_a8_supports, _fp8_a8_bind, PRIORITY),
        *cuda_rows(family, "quanto", "triton-quanto-int2", _int2_supports, _int2_bind, PRIORITY),
    ]
