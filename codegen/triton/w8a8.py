"""W8A8: 8-bit weights per channel × 8-bit activations quantized per row at run time — ``w8a8`` and ``fp8-w8a8``.

Reads the canonical packed layouts (``qcompile.schemes.w8a8``, ``qcompile.schemes.fp8``) directly::

    w8a8:      qweight int8 [N, K], scales float32 [N, 1]             x_scale[m] = absmax(x[m]) / 127
    fp8-w8a8:  qweight float8_e4m3fn [N, K], scales float32 [N, 1]    x_scale[m] = absmax(x[m]) / 448
    y[m, n] = (sum_k x_q[m, k] * q[n, k]) * x_scale[m] * scales[n] + bias[n]

Two kernels: ``quantize_rows_kernel`` (one program per row: absmax, then round/clamp, as the reference does) and
``w8a8_linear_kernel``, whose ``tl.dot`` takes the 8-bit tiles as they are: int8 × int8 with exact int32
accumulation, or e4m3 × e4m3 with fp32 accumulation (sm_89+). Split-K (small M) scales each split's exact sum
before the splits are added in fp32.

Under ``TRITON_INTERPRET=1`` both dots work (triton 3.7.1), but the interpreter's fp32 → e4m3 cast rounds wrongly
when the mantissa carries into the next binade (125.9 → 64); there values are first rounded to the e4m3 grid in
fp32 (``ROUND_FP8_IN_FP32``), so the cast only meets exact values. GPUs use the hardware conversion.

Order of this file: autotune key, config generators, the kernels, the launcher.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from qcompile.codegen.triton import autotune, candidates, common
from qcompile.codegen.triton.tiles import (
    in_k,
    load_bias,
    split_k_range,
    store_tile,
    tile_indices,
    tile_pointers,
    tile_start,
)
from qcompile.schemes import FP8, W8A8Int, as_scheme

INT8_MAX = 127.0
E4M3_MAX = 448.0
QUANTIZE_BLOCK = 1024


def serves(scheme) -> str | None:
    if isinstance(scheme, W8A8Int) or (isinstance(scheme, FP8) and scheme.activations):
        return None
    return f"{scheme.name} does not quantize activations"


# -- autotune key -------------------------------------------------------------------------------------------------
def tune_key(scheme_name: str, m: int, n: int, k: int, device: torch.device) -> str:
    return autotune.tune_key(f"w8a8-{scheme_name}-gemm", m, n, k, k, device)


# -- config generators --------------------------------------------------------------------------------------------
def candidate_configs(m: int, k: int) -> list[autotune.KernelConfig]:
    """8-bit ``tl.dot`` wants ``BLOCK_K >= 32``; small M also tries split-K (each split's integer sum is exact)."""
    configs = candidates.standard_candidates("gemm", m, k, dequant=False)
    if common.m_bucket(m) >= 128:  # 8-bit operands: K tiles of 128 fill the tensor cores at the same bytes
        configs += [
            autotune.KernelConfig(128, 256, 128, num_warps=8, num_stages=3),
            autotune.KernelConfig(256, 128, 128, num_warps=8, num_stages=3),
            autotune.KernelConfig(128, 128, 128, num_warps=4, num_stages=4),
        ]
    if common.m_bucket(m) <= 64:  # few row tiles: split K so that every SM streams weights
        configs += [dataclasses.replace(c, split_k=split) for c in configs if c.split_k == 1 for split in (4, 8)]
    return [c for c in configs if c.block_k >= 32]


def default_config(m: int) -> autotune.KernelConfig:
    return candidates.standard_default("gemm", m, dequant=False)


# -- kernels ------------------------------------------------------------------------------------------------------
@triton.jit
def round_half_even(v):
    """``torch.round`` in fp32: nearest integer, ties to even (exact for ``|v| < 2**23``)."""
    low = tl.floor(v)
    frac = v - low
    odd = (low - 2.0 * tl.floor(low * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return tl.where(up, low + 1.0, low)


@triton.jit
def round_to_e4m3_grid(v):
    """Nearest float8 e4m3 value (ties to even) of fp32 ``v`` with ``|v| <= 448``, still in fp32."""
    magnitude = tl.abs(v)
    exponent = tl.floor(tl.log2(tl.maximum(magnitude, 1e-30)))
    exponent = tl.where(tl.exp2(exponent) > magnitude, exponent - 1.0, exponent)
    exponent = tl.where(tl.exp2(exponent + 1.0) <= magnitude, exponent + 1.0, exponent)
    quantum = tl.exp2(tl.maximum(exponent, -6.0) - 3.0)  # 3 mantissa bits; subnormals below 2**-6
    return round_half_even(v / quantum) * quantum


@triton.jit
def quantize_rows_kernel(
    x_ptr, q_ptr, x_scale_ptr, K, stride_xm, stride_qm,
    QMAX: tl.constexpr, TO_FP8: tl.constexpr, ROUND_FP8_IN_FP32: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Per-row symmetric quantization: ``x_scale[m] = absmax(x[m]) / QMAX`` (1 when the row is zero).

    ``x`` fp16/bf16/fp32 ``[M, K]``; ``q`` int8 (``round`` half-even, clamp to ±127) or float8_e4m3fn (clamp to
    ±448, round to nearest) ``[M, K]``; ``x_scale`` fp32 ``[M]``. Grid: ``(M,)``.
    """
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    absmax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.abs(x))
    scale = tl.max(absmax, axis=0) / QMAX
    scale = tl.where(scale > 0.0, scale, 1.0)
    tl.store(x_scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        v = tl.math.div_rn(tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32), scale)
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
        if TO_FP8:
            if ROUND_FP8_IN_FP32:
                v = round_to_e4m3_grid(v)
        else:
            v = round_half_even(v)
        tl.store(q_ptr + row.to(tl.int64) * stride_qm + k0 + offs, v.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def w8a8_linear_kernel(
    xq_ptr, x_scale_ptr, qweight_ptr, scales_ptr, bias_ptr, out_ptr, work_ptr, count_ptr,
    M, N, K, SPLIT_K, stride_xm, stride_qn, stride_om,
    HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``out[M, N] = (xq[M, K] @ qweight.T) * x_scale[M] * scales[N] + bias``.

    ``xq``/``qweight``: both int8 (``ACC_DTYPE`` int32, exact) or both float8_e4m3fn (``ACC_DTYPE`` fp32);
    ``x_scale`` fp32 ``[M]``; ``scales`` fp32 ``[N]``; ``bias`` ``[N]``; ``out`` ``[M, N]`` float.
    Grid: ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K)``. Constraints: blocks ``>= 16``, ``BLOCK_K >= 32``.
    With ``SPLIT`` each split's integer sum stays exact; it is scaled to fp32 and the splits meet in the fp32
    workspace (``tiles.store_tile``), so only the fp32 additions of a few partial results are reordered.
    """
    pid_m, pid_n = tile_indices(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_begin, k_end = split_k_range(K, SPLIT_K, BLOCK_K)
    offs_m, offs_n, mask_m, mask_n, x_rows, w_cols = tile_pointers(
        xq_ptr, qweight_ptr, pid_m, pid_n, M, N, stride_xm, stride_qn, BLOCK_M, BLOCK_N
    )
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = tile_start(k0, BLOCK_K) + offs_k
        mask_k = in_k(ks, K, EVEN_K)
        a = tl.load(x_rows + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_cols + ks[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, out_dtype=ACC_DTYPE)
    x_scale = tl.load(x_scale_ptr + offs_m, mask=mask_m, other=0.0)
    scale = tl.load(scales_ptr + offs_n, mask=mask_n, other=0.0)
    y = acc.to(tl.float32) * x_scale[:, None] * scale[None, :] + load_bias(bias_ptr, offs_n, N, HAS_BIAS, BLOCK_N)
    store_tile(out_ptr, y, offs_m, offs_n, M, N, stride_om, work_ptr, count_ptr, SPLIT_K, SPLIT)


# -- launchers ----------------------------------------------------------------------------------------------------
def quantize_rows(x2: torch.Tensor, to_fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` → ``(int8 or float8_e4m3fn [M, K], float32 [M])``, as ``quantize_per_token_int8`` /
    ``quantize_rowwise_fp8`` compute it."""
    m, k = x2.shape
    q = torch.empty((m, k), device=x2.device, dtype=torch.float8_e4m3fn if to_fp8 else torch.int8)
    x_scale = torch.empty((m,), device=x2.device, dtype=torch.float32)
    if m:
        common.kernel(quantize_rows_kernel)[(m,)](
            x2, q, x_scale, k, x2.stride(0), q.stride(0),
            QMAX=E4M3_MAX if to_fp8 else INT8_MAX, TO_FP8=to_fp8, ROUND_FP8_IN_FP32=common.interpreting(),
            BLOCK_K=min(QUANTIZE_BLOCK, common.next_power_of_2(k)),
        )  # fmt: skip
    return q, x_scale


def bind(scheme, x, qweight, scales, zeros, bias, *, path: str | None = None, config=None):
    """``launch(x, qweight, scales, zeros, bias) -> y`` for calls with this one's signature, validated once; the
    config and its kernel arguments are worked out on the first call (see ``int4.bind``). ``path`` is unused (one
    GEMM kernel serves every M)."""
    scheme = as_scheme(scheme)
    reason = serves(scheme)
    if reason is not None:
        raise ValueError(f"w8a8_linear: {reason}")
    _, m, n, k = common.prepare_rows(x, qweight, scales, zeros, scheme, "w8a8_linear")
    to_fp8, device, has_bias = isinstance(scheme, FP8), x.device, bias is not None

    def build(cfg: autotune.KernelConfig, _):
        grid = (common.cdiv(m, cfg.block_m) * common.cdiv(n, cfg.block_n), cfg.split_k)
        meta = dict(
            HAS_BIAS=has_bias, ACC_DTYPE=tl.float32 if to_fp8 else tl.int32, SPLIT=cfg.split_k > 1,
            EVEN_K=k % cfg.block_k == 0, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

        name = f"the W8A8 kernel ({cfg})"

        def linear(x_q, x_scale, qweight, scales, bias, dtype):
            out = torch.empty((m, n), device=x_q.device, dtype=dtype)
            work, counts = (common.split_workspace(x_q.device, m * n, grid[0]) if cfg.split_k > 1
                            else common.no_workspace(out))  # fmt: skip
            try:
                common.kernel(w8a8_linear_kernel)[grid](
                    x_q, x_scale, qweight, scales, scales if bias is None else bias, out, work, counts,
                    m, n, k, cfg.split_k, x_q.stride(0), k, n, **meta,
                )  # fmt: skip
            except Exception as error:
                if not common.fewer_stages(error, meta, name):
                    raise
                return linear(x_q, x_scale, qweight, scales, bias, dtype)
            return out

        return linear

    bound = autotune.BoundLaunches(
        lambda: tune_key(scheme.name, m, n, k, device),
        lambda: candidate_configs(m, k), lambda: default_config(m), build, device, config,
    )  # fmt: skip

    def run(x, qweight, scales, zeros, bias) -> torch.Tensor:
        x2 = common.as_rows(x)
        x_q, x_scale = quantize_rows(x2, to_fp8)
        out = bound(None, x_q, x_scale, qweight.contiguous(), scales.reshape(-1).contiguous(), bias, x.dtype)
        return common.as_input_shape(out, x)

    run.bound = bound  # its config, for reports
    return run


def w8a8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    scheme,
    *,
    config: autotune.KernelConfig | None = None,
) -> torch.Tensor:
    """``qcompile::linear`` for ``w8a8`` and ``fp8-w8a8``."""
    return bind(scheme, x, qweight, scales, zeros, bias, config=config)(x, qweight, scales, zeros, bias)
