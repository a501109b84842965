"""W4A16: ``int4-gN`` (asymmetric and ``-sym``) weights dequantized in registers right before ``tl.dot``.

Reads the canonical packed layout (``qcompile.schemes.integer`` / ``packing``) directly::

    qweight uint8 [N, K_padded / 2]   element 2j in the low nibble of byte j, element 2j+1 in the high nibble
    scales  float32 [N, G]            G = K_padded / group_size
    zeros   float32 [N, G]            asymmetric: w = (u - zero) * scale;  symmetric (no zeros): w = (u - 8) * scale

Each K tile is handled as two half tiles: the even columns of ``x`` meet the low nibbles, the odd columns the high
nibbles, so one byte load feeds two dots and no interleave/reshape is needed. Columns ``K .. K_padded`` are masked
(``K = x.shape[-1]``).

Order of this file: autotune key, config generators, the kernel, the launcher.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from qcompile.codegen.triton import autotune, common
from qcompile.codegen.triton.tiles import load_bias, split_k_range, store_tile, tile_indices
from qcompile.schemes import IntWeightOnly, as_scheme

KERNEL_NAME = "int4"


# -- autotune key -------------------------------------------------------------------------------------------------
def tune_key(path: str, m: int, n: int, k: int, group_size: int, device: torch.device) -> str:
    return autotune.tune_key(f"{KERNEL_NAME}-{path}", m, n, k, group_size, device)


# -- config generators --------------------------------------------------------------------------------------------
def candidate_configs(path: str, m: int, k: int, group_size: int | None = None) -> list[autotune.KernelConfig]:
    """Two dots of ``BLOCK_K / 2`` per tile: dot paths need ``BLOCK_K >= 32``; they are tried in both tile forms
    (``whole_tile``). With ``group_size``, BLOCK_K is shrunk to the group as the launcher would, and duplicates
    dropped."""
    out = []
    for config in autotune.standard_candidates(path, m, k):
        if path != "gemv" and config.block_k < 32:
            continue
        if group_size is not None and not config.dequant:
            block_k, _ = aligned_block_k(config.block_k, group_size, path != "gemv")
            config = dataclasses.replace(config, block_k=block_k)
        for variant in (config, dataclasses.replace(config, whole_tile=1)) if path != "gemv" else (config,):
            if variant not in out and not (variant.whole_tile and variant.dequant):
                out.append(variant)
    return out


def default_config(path: str, m: int) -> autotune.KernelConfig:
    return autotune.standard_default(path, m)


def aligned_block_k(block_k: int, group_size: int, use_dot: bool) -> tuple[int, bool]:
    """``(BLOCK_K, group aligned)``: shrink BLOCK_K to divide the group so each tile reads one scale per column."""
    smallest = 32 if use_dot else 2
    candidate = block_k
    while candidate >= smallest:
        if group_size % candidate == 0:
            return candidate, True
        candidate //= 2
    return block_k, False


# -- kernel -------------------------------------------------------------------------------------------------------
@triton.jit
def codes(packed, USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """``(low, high, offset)``: the nibbles of ``packed`` (uint8) as exact floats ``code + offset``, no int→float cvt.

    The exponent bits are OR-ed in (conversion instructions run at a fraction of the ALU rate): 16-bit dot operands
    are ``128 + code`` (bf16) or ``1024 + code`` (fp16), exact, and the caller subtracts ``offset * sum(x)`` from the
    fp32 sums; fp32 operands are ``2**23 + code`` minus ``2**23``, i.e. the code itself (``offset`` 0).
    """
    if USE_DOT and DOT_DTYPE == tl.bfloat16:
        bits = packed.to(tl.int16)
        low = ((bits & 0xF) | 0x4300).to(tl.bfloat16, bitcast=True)
        high = (((bits >> 4) & 0xF) | 0x4300).to(tl.bfloat16, bitcast=True)
        offset = 128.0
    elif USE_DOT and DOT_DTYPE == tl.float16:
        bits = packed.to(tl.int16)
        low = ((bits & 0xF) | 0x6400).to(tl.float16, bitcast=True)
        high = (((bits >> 4) & 0xF) | 0x6400).to(tl.float16, bitcast=True)
        offset = 1024.0
    else:
        bits = packed.to(tl.int32)
        low = ((bits & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        high = (((bits >> 4) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        offset = 0.0
    return low, high, offset


@triton.jit
def tile_codes(packed, offs_k, DOT_DTYPE: tl.constexpr):
    """``(codes + offset, offset)`` of a ``[BLOCK_K, BLOCK_N]`` tile whose row ``k`` holds the bytes of column
    ``k // 2``: even rows take the low nibble, odd rows the high one (exponent bits OR-ed in, as :func:`codes`)."""
    shift = ((offs_k % 2) * 4)[:, None]
    if DOT_DTYPE == tl.bfloat16:
        w = (((packed.to(tl.int16) >> shift.to(tl.int16)) & 0xF) | 0x4300).to(tl.bfloat16, bitcast=True)
        offset = 128.0
    elif DOT_DTYPE == tl.float16:
        w = (((packed.to(tl.int16) >> shift.to(tl.int16)) & 0xF) | 0x6400).to(tl.float16, bitcast=True)
        offset = 1024.0
    else:
        w = (((packed.to(tl.int32) >> shift) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        offset = 0.0
    return w, offset


@triton.jit
def int4_linear_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, work_ptr, count_ptr,
    M, N, K, SPLIT_K, stride_xm, stride_qn, stride_sn, stride_om,
    GROUP_SIZE: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_ALIGNED: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr,
    WHOLE_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``out[M, N] = x[M, K] @ dequant(qweight).T + bias``.

    Shapes and dtypes: ``x`` fp16/bf16/fp32 ``[M, K]`` (unit stride along K); ``qweight`` uint8 ``[N, K_padded/2]``;
    ``scales``/``zeros`` fp32 ``[N, K_padded/GROUP_SIZE]`` (``zeros`` unused when ``SYMMETRIC``); ``bias`` ``[N]``;
    ``out`` ``[M, N]`` in x's dtype; with ``SPLIT`` the splits meet in the fp32 workspace ``work [M, N]`` and the
    int32 tile counters ``count`` (zeros before and after, see ``tiles.store_tile``).
    Grid: ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K)``.
    Constraints: ``BLOCK_K`` even; with ``USE_DOT`` ``BLOCK_M, BLOCK_N >= 16`` and ``BLOCK_K >= 32``;
    ``GROUP_ALIGNED`` requires ``GROUP_SIZE % BLOCK_K == 0`` (one scale per column per tile), otherwise scales are
    gathered per element. ``USE_DOT=False`` is the GEMV form (``tl.sum`` over a broadcast product), for tiny M.
    Group-aligned dot tiles come in two forms: two half-K dots (low nibbles with the even columns of ``x``, high
    nibbles with the odd ones) or, with ``WHOLE_TILE``, one dot over the ``[BLOCK_K, BLOCK_N]`` codes unpacked by
    shifts; which is faster depends on the GPU and the shape, so the tuner tries both.
    """
    pid_m, pid_n = tile_indices(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_begin, k_end = split_k_range(K, SPLIT_K, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_K // 2)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = qweight_ptr + offs_n.to(tl.int64)[None, :] * stride_qn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + offs_k
        x = tl.load(x_rows + ks[None, :], mask=mask_m[:, None] & (ks < K)[None, :], other=0.0)
        if GROUP_ALIGNED:
            # one group per tile: dot the codes themselves, apply scale and zero to the [BLOCK_M, BLOCK_N] sums
            group = k0 // GROUP_SIZE
            scale = tl.load(scales_ptr + offs_n * stride_sn + group, mask=mask_n, other=0.0)[None, :]
            if SYMMETRIC:
                zero = 8.0
            else:
                zero = tl.load(zeros_ptr + offs_n * stride_sn + group, mask=mask_n, other=0.0)[None, :]
            if USE_DOT and WHOLE_TILE:
                # each byte loaded for both of its rows of the [BLOCK_K, BLOCK_N] tile: one dot, x as loaded
                w_mask = (ks < K)[:, None] & mask_n[None, :]
                packed = tl.load(w_cols + (k0 // 2 + offs_k // 2)[:, None], mask=w_mask, other=0)
                w, offset = tile_codes(packed, offs_k, DOT_DTYPE)
                sums = tl.dot(x.to(DOT_DTYPE), w, input_precision=DOT_PRECISION)
                x_sum = tl.sum(x.to(tl.float32), axis=1)
            else:
                x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))  # deinterleave in registers
                w_mask = (k0 + 2 * offs_h < K)[:, None] & mask_n[None, :]
                packed = tl.load(w_cols + (k0 // 2 + offs_h)[:, None], mask=w_mask, other=0)
                low, high, offset = codes(packed, USE_DOT, DOT_DTYPE)
                if USE_DOT:
                    sums = tl.dot(x_even.to(DOT_DTYPE), low, input_precision=DOT_PRECISION)
                    sums = tl.dot(x_odd.to(DOT_DTYPE), high, sums, input_precision=DOT_PRECISION)
                elif BLOCK_M == 1:
                    x_even1 = tl.sum(x_even.to(tl.float32), axis=0)  # [BLOCK_K / 2]: the one row
                    x_odd1 = tl.sum(x_odd.to(tl.float32), axis=0)
                    sums = (tl.sum(low * x_even1[:, None], axis=0) + tl.sum(high * x_odd1[:, None], axis=0))[None, :]
                else:
                    sums = tl.sum(x_even.to(tl.float32)[:, :, None] * low[None, :, :], axis=1)
                    sums += tl.sum(x_odd.to(tl.float32)[:, :, None] * high[None, :, :], axis=1)
                x_sum = tl.sum(x_even.to(tl.float32), axis=1) + tl.sum(x_odd.to(tl.float32), axis=1)
            acc += scale * (sums - x_sum[:, None] * (zero + offset))
        else:
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
            k_even = k0 + 2 * offs_h
            w_mask = (k_even < K)[:, None] & mask_n[None, :]
            packed = tl.load(w_cols + (k0 // 2 + offs_h)[:, None], mask=w_mask, other=0)
            meta = offs_n[None, :] * stride_sn + (k_even // GROUP_SIZE)[:, None]
            scale = tl.load(scales_ptr + meta, mask=w_mask, other=0.0)
            if SYMMETRIC:
                zero = 8.0
            else:
                zero = tl.load(zeros_ptr + meta, mask=w_mask, other=0.0)
            w_even = ((packed & 0xF).to(tl.float32) - zero) * scale
            w_odd = (((packed >> 4) & 0xF).to(tl.float32) - zero) * scale
            if USE_DOT:
                acc += tl.dot(x_even.to(DOT_DTYPE), w_even.to(DOT_DTYPE), input_precision=DOT_PRECISION)
                acc += tl.dot(x_odd.to(DOT_DTYPE), w_odd.to(DOT_DTYPE), input_precision=DOT_PRECISION)
            else:
                acc += tl.sum(x_even.to(tl.float32)[:, :, None] * w_even[None, :, :], axis=1)
                acc += tl.sum(x_odd.to(tl.float32)[:, :, None] * w_odd[None, :, :], axis=1)
    acc += load_bias(bias_ptr, offs_n, N, HAS_BIAS, BLOCK_N)
    store_tile(out_ptr, acc, offs_m, offs_n, M, N, stride_om, work_ptr, count_ptr, SPLIT_K, SPLIT)


@triton.jit
def int4_dequantize_kernel(
    qweight_ptr, scales_ptr, zeros_ptr, out_ptr, N, K, stride_qn, stride_sn, stride_on,
    GROUP_SIZE: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``out[N, K] = (code - zero) * scale`` in out's dtype: the weight for a cuBLAS GEMM at large M.

    Each byte is loaded for both of its columns (the second load hits L1); stores run along K.
    Grid: ``(cdiv(N, BLOCK_N), cdiv(K, BLOCK_K))``.
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    rows = offs_n.to(tl.int64)[:, None]
    packed = tl.load(qweight_ptr + rows * stride_qn + (offs_k // 2)[None, :], mask=mask, other=0).to(tl.int32)
    code = ((packed >> ((offs_k % 2) * 4)[None, :]) & 0xF).to(tl.float32)
    meta = rows * stride_sn + (offs_k // GROUP_SIZE)[None, :]
    scale = tl.load(scales_ptr + meta, mask=mask, other=0.0)
    if SYMMETRIC:
        zero = 8.0
    else:
        zero = tl.load(zeros_ptr + meta, mask=mask, other=0.0)
    tl.store(out_ptr + rows * stride_on + offs_k[None, :], ((code - zero) * scale).to(out_ptr.dtype.element_ty),
             mask=mask)  # fmt: skip


# -- launcher -----------------------------------------------------------------------------------------------------
def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    scheme,
    *,
    path: str | None = None,
    config: autotune.KernelConfig | None = None,
) -> torch.Tensor:
    """``qcompile::linear`` for ``int4-gN`` schemes. ``path`` (``gemv``/``splitk``/``gemm``) defaults by M."""
    scheme = as_scheme(scheme)
    if not (isinstance(scheme, IntWeightOnly) and scheme.bits == 4):
        raise ValueError(f"int4_linear serves int4 weight-only schemes, got {scheme.name}")
    x2, m, n, k = common.prepare_rows(x, qweight, scales, zeros, scheme, "int4_linear")
    group_size = scheme.group_size_for(k)
    path = path or common.path_for_m(m)
    use_dot = path != "gemv"
    scales, qweight = scales.contiguous(), qweight.contiguous()
    zeros = zeros.contiguous() if zeros is not None else None

    def launch(cfg: autotune.KernelConfig) -> torch.Tensor:
        if cfg.dequant:
            weight = torch.empty((n, k), device=x.device, dtype=x.dtype)
            int4_dequantize_kernel[(triton.cdiv(n, cfg.block_n), triton.cdiv(k, cfg.block_k))](
                qweight, scales, scales if zeros is None else zeros, weight, n, k,
                qweight.stride(0), scales.stride(0), weight.stride(0),
                GROUP_SIZE=group_size, SYMMETRIC=zeros is None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                num_warps=cfg.num_warps,
            )  # fmt: skip
            return torch.nn.functional.linear(x2, weight, None if bias is None else bias.to(x.dtype))
        block_k, aligned = aligned_block_k(cfg.block_k, group_size, use_dot)
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
        work, counts = common.split_workspace(x.device, m * n, grid[0]) if cfg.split_k > 1 else (out, out)
        int4_linear_kernel[grid](
            x2, qweight, scales, scales if zeros is None else zeros, scales if bias is None else bias,
            out, work, counts,
            m, n, k, cfg.split_k, x2.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
            GROUP_SIZE=group_size, SYMMETRIC=zeros is None, HAS_BIAS=bias is not None, GROUP_ALIGNED=aligned,
            USE_DOT=use_dot, DOT_DTYPE=common.dot_dtype(x.dtype), DOT_PRECISION=common.dot_precision(x.dtype),
            SPLIT=cfg.split_k > 1, WHOLE_TILE=cfg.whole_tile == 1,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        return out

    if config is None:
        config = autotune.memoized_choice(
            (KERNEL_NAME, path, common.m_bucket(m), n, k, group_size, x.device),
            lambda: autotune.choose_config(
                tune_key(path, m, n, k, group_size, x.device), lambda: candidate_configs(path, m, k, group_size),
                default_config(path, m), launch, x.device,
            ),
        )  # fmt: skip
    return launch(config).reshape(*x.shape[:-1], n)
