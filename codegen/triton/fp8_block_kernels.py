"""The ``@triton.jit`` kernels of ``fp8-block`` (launcher and rows: :mod:`qcompile.codegen.triton.fp8_block`).

``quantize_groups_kernel``: per token and group of 128 inputs, ``s = amax / 448`` (``ue8m0``: the next power of two at
or above it), ``xq = e4m3(clamp(x / s))``, both divisions rounded to nearest (``div_rn``) as the reference's float32
ones are. ``fp8_block_gemm_kernel``: one 128-wide K step per group, ``tl.dot`` of the e4m3 tiles (fp32 sums), scaled
by ``s[m, g] * scales[n // 128, g]`` and added up in fp32; optionally split along K over whole groups.
"""

from __future__ import annotations

import triton
import triton.language as tl

from qcompile.codegen.triton.tiles import (
    in_k,
    load_bias,
    split_k_range,
    store_tile,
    tile_indices,
    tile_pointers,
    tile_start,
)
from qcompile.codegen.triton.w8a8 import round_to_e4m3_grid

E4M3_MAX = tl.constexpr(448.0)


@triton.jit
def round_up_pow2(s):
    """fp32 ``s`` → ``2 ** (exponent + (mantissa != 0))`` from its bits (DeepSeek's ue8m0 scales)."""
    bits = s.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return (exponent << 23).to(tl.float32, bitcast=True)


@triton.jit
def quantize_groups_kernel(
    x_ptr, q_ptr, s_ptr, K, G, stride_xm, stride_qm,
    UE8M0: tl.constexpr, ROUND_FP8_IN_FP32: tl.constexpr, GROUP_K: tl.constexpr,
):  # fmt: skip
    """``x`` fp16/bf16/fp32 ``[M, K]`` → ``q`` float8_e4m3fn ``[M, K]``, ``s`` fp32 ``[M, G]`` (1 for an all-zero
    group). Grid: ``(M, G)``. ``ROUND_FP8_IN_FP32``: round to the e4m3 grid in fp32 before the cast (interpreter)."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    offs = g * GROUP_K + tl.arange(0, GROUP_K)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    s = tl.math.div_rn(amax, tl.full((), E4M3_MAX, tl.float32))
    if UE8M0:
        s = round_up_pow2(s)
    s = tl.where(s > 0.0, s, 1.0)
    tl.store(s_ptr + row * G + g, s)
    v = tl.math.div_rn(x, s)
    v = tl.minimum(tl.maximum(v, -E4M3_MAX), E4M3_MAX)
    if ROUND_FP8_IN_FP32:
        v = round_to_e4m3_grid(v)
    tl.store(q_ptr + row * stride_qm + offs, v.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fp8_block_gemm_kernel(
    xq_ptr, xs_ptr, q_ptr, ws_ptr, bias_ptr, out_ptr, work_ptr, count_ptr, M, N, K, G, SPLIT_K,
    stride_xm, stride_qn, stride_om,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``out[m, n] = sum_g (xq[m, g] . q[n, g]) * xs[m, g] * ws[n // 128, g] + bias[n]``.

    ``xq`` float8_e4m3fn ``[M, K]``; ``xs`` fp32 ``[M, G]``; ``q`` float8_e4m3fn ``[N, K]``; ``ws`` fp32
    ``[ceil(N/128), G]``; ``bias`` ``[N]``; ``out`` ``[M, N]``. Grid: ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),
    SPLIT_K)``; each split takes a run of whole groups and, with ``SPLIT``, the splits meet in the fp32 workspace
    (``tiles.store_tile``). ``BLOCK_N`` divides 128, so a tile's columns share one row of ``ws``. ``UPCAST``: dot
    in fp32 (the interpreter), else e4m3 × e4m3 with fp32 accumulation (sm_89+). ``EVEN_K``: K a multiple of 128
    (no bounds mask along K, so loads stay vectorized).
    """
    pid_m, pid_n = tile_indices(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_begin, k_end = split_k_range(K, SPLIT_K, GROUP_K)
    offs_m, offs_n, mask_m, mask_n, x_rows, w_cols = tile_pointers(
        xq_ptr, q_ptr, pid_m, pid_n, M, N, stride_xm, stride_qn, BLOCK_M, BLOCK_N
    )
    offs_k = tl.arange(0, GROUP_K)
    ws_row = ws_ptr + ((pid_n * BLOCK_N) // GROUP_K) * G
    xs_rows = xs_ptr + offs_m.to(tl.int64) * G
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, GROUP_K):
        ks = tile_start(k0, GROUP_K) + offs_k
        mask_k = in_k(ks, K, EVEN_K)
        a = tl.load(x_rows + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_cols + ks[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            part = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(a, b, out_dtype=tl.float32)
        g = k0 // GROUP_K
        xs = tl.load(xs_rows + g, mask=mask_m, other=0.0)
        acc += part * (xs * tl.load(ws_row + g))[:, None]
    acc += load_bias(bias_ptr, offs_n, N, HAS_BIAS, BLOCK_N)
    store_tile(out_ptr, acc, offs_m, offs_n, M, N, stride_om, work_ptr, count_ptr, SPLIT_K, SPLIT)
