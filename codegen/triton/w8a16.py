"""W8A16: 8-bit weights per output channel, float activations — ``int8`` and ``fp8`` (weight-only).

Reads the canonical packed layouts (``qcompile.schemes.integer``, ``qcompile.schemes.fp8``) directly::

    int8: qweight int8 [N, K]            w = q * scales[n]          scales float32 [N, 1], no zeros
    fp8:  qweight float8_e4m3fn [N, K]   w = float(q) * scales[n]   scales float32 [N, 1], no zeros

Both codes convert exactly to bf16/fp16, so the tile is cast right before ``tl.dot`` and the per-channel scale is
applied once, in the epilogue. Grouped or asymmetric int8 (``int8-g128``, ``int8-asym``) is not served here.

Order of this file: autotune key, config generators, the kernel, the launcher.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from qcompile.codegen.triton import autotune, candidates, common
from qcompile.codegen.triton.tiles import (
    bits_as_float,
    in_k,
    load_bias,
    split_k_range,
    store_tile,
    tile_indices,
    tile_pointers,
    tile_start,
)
from qcompile.schemes import FP8, IntWeightOnly, as_scheme


def serves(scheme) -> str | None:
    """``None`` when this family serves ``scheme``, else why not."""
    if isinstance(scheme, FP8) and not scheme.activations:
        return None
    if isinstance(scheme, IntWeightOnly) and scheme.bits == 8:
        if scheme.group_size is not None or not scheme.symmetric:
            return "only per-channel symmetric int8 has a Triton W8A16 kernel"
        return None
    return f"{scheme.name} is not an 8-bit weight-only scheme"


# -- autotune key -------------------------------------------------------------------------------------------------
def tune_key(scheme_name: str, path: str, m: int, n: int, k: int, device: torch.device) -> str:
    return autotune.tune_key(f"w8a16-{scheme_name}-{path}", m, n, k, k, device)


# -- config generators --------------------------------------------------------------------------------------------
def candidate_configs(path: str, m: int, k: int) -> list[autotune.KernelConfig]:
    """The standard candidates; GEMV tiles also with int32-word loads (``words``)."""
    out = [c for c in candidates.standard_candidates(path, m, k) if path == "gemv" or c.block_k >= 16]
    return out + [dataclasses.replace(c, words=1) for c in out] if path == "gemv" else out


def default_config(path: str, m: int) -> autotune.KernelConfig:
    return candidates.standard_default(path, m)


# -- kernel -------------------------------------------------------------------------------------------------------
@triton.jit
def as_float(w):
    """int8 or e4m3 codes as exact fp32; int8 bytes go through :func:`byte_as_float`."""
    if w.dtype == tl.int8:
        return byte_as_float(w.to(tl.int32) & 0xFF, tl.int8)
    return w.to(tl.float32)


@triton.jit
def byte_as_float(byte, CODE_DTYPE: tl.constexpr):
    """The exact fp32 value of an int8 or e4m3 code held in the low 8 bits of int32 ``byte``. int8 skips the
    int→float conversion: the byte, offset to ``q + 128``, goes through ``tiles.bits_as_float``."""
    if CODE_DTYPE == tl.int8:
        return bits_as_float(byte ^ 0x80, 128.0)
    return byte.to(tl.uint8).to(CODE_DTYPE, bitcast=True).to(tl.float32)


@triton.jit
def w8a16_linear_kernel(
    x_ptr, qweight_ptr, scales_ptr, bias_ptr, out_ptr, work_ptr, count_ptr,
    M, N, K, SPLIT_K, stride_xm, stride_qn, stride_om,
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SPLIT: tl.constexpr, WORDS: tl.constexpr, BLOCK_W: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``out[M, N] = (x[M, K] @ float(qweight).T) * scales[N] + bias``.

    Shapes and dtypes: ``x`` fp16/bf16/fp32 ``[M, K]`` (unit stride along K); ``qweight`` int8 or float8_e4m3fn
    ``[N, K]``; ``scales`` fp32 ``[N]`` (the ``[N, 1]`` tensor); ``bias`` ``[N]``; ``out`` ``[M, N]`` in x's dtype;
    with ``SPLIT`` the splits meet in the fp32 workspace (``tiles.store_tile``).
    Grid: ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K)``.
    Constraints: with ``USE_DOT`` every block is ``>= 16``; ``USE_DOT=False`` is the GEMV form for tiny M.
    ``WORDS`` (GEMV only): the codes are loaded as int32 words, 4 a word, in 4 planes ``[BLOCK_W, BLOCK_N]``
    (``BLOCK_W = BLOCK_K / 4``; plane ``i`` holds columns ``4j + i``); needs ``K % 4 == 0`` and 4-byte aligned rows.
    """
    pid_m, pid_n = tile_indices(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_begin, k_end = split_k_range(K, SPLIT_K, BLOCK_K)
    offs_m, offs_n, mask_m, mask_n, x_rows, w_cols = tile_pointers(
        x_ptr, qweight_ptr, pid_m, pid_n, M, N, stride_xm, stride_qn, BLOCK_M, BLOCK_N
    )
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_rows = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)  # the one-row GEMV's elementwise sums
    offs_w = tl.arange(0, BLOCK_W)
    w_words = w_cols.to(tl.pointer_type(tl.int32), bitcast=True)
    acc_words = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)  # the same, for WORDS
    for k0 in range(k_begin, k_end, BLOCK_K):
        k0 = tile_start(k0, BLOCK_K)
        if WORDS:
            kw = k0 // 4 + offs_w
            words = tl.load(w_words + kw[:, None], mask=in_k(kw * 4, K, EVEN_K)[:, None] & mask_n[None, :], other=0)
            for i in tl.static_range(4):
                w = byte_as_float((words >> (8 * i)) & 0xFF, qweight_ptr.dtype.element_ty)
                ks = kw * 4 + i
                x = tl.load(x_rows + ks[None, :], mask=mask_m[:, None] & in_k(ks, K, EVEN_K)[None, :], other=0.0)
                if BLOCK_M == 1:
                    acc_words += tl.sum(x.to(tl.float32), axis=0)[:, None] * w
                else:
                    acc += tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
        else:
            ks = k0 + offs_k
            mask_k = in_k(ks, K, EVEN_K)
            x = tl.load(x_rows + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_cols + ks[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if USE_DOT:
                acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
            elif BLOCK_M == 1:
                acc_rows += tl.sum(x.to(tl.float32), axis=0)[:, None] * as_float(w)
            else:
                acc += tl.sum(x.to(tl.float32)[:, :, None] * as_float(w)[None, :, :], axis=1)
    if not USE_DOT and BLOCK_M == 1:
        if WORDS:
            acc += tl.sum(acc_words, axis=0)[None, :]
        else:
            acc += tl.sum(acc_rows, axis=0)[None, :]
    scale = tl.load(scales_ptr + offs_n, mask=mask_n, other=0.0)
    acc = acc * scale[None, :] + load_bias(bias_ptr, offs_n, N, HAS_BIAS, BLOCK_N)
    store_tile(out_ptr, acc, offs_m, offs_n, M, N, stride_om, work_ptr, count_ptr, SPLIT_K, SPLIT)


@triton.jit
def w8_dequantize_kernel(
    qweight_ptr, scales_ptr, out_ptr, N, K, stride_qn, stride_on, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``out[N, K] = float(qweight) * scales[n]`` in out's dtype: the weight for a cuBLAS GEMM at large M.
    Grid: ``(cdiv(N, BLOCK_N), cdiv(K, BLOCK_K))``."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    rows = offs_n.to(tl.int64)[:, None]
    q = tl.load(qweight_ptr + rows * stride_qn + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scales_ptr + offs_n, mask=offs_n < N, other=0.0)
    weight = (q * scale[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows * stride_on + offs_k[None, :], weight, mask=mask)


# -- launcher -----------------------------------------------------------------------------------------------------
def bind(scheme, x, qweight, scales, zeros, bias, *, path: str | None = None, config=None):
    """``launch(x, qweight, scales, zeros, bias) -> y`` for calls with this one's signature, validated once; the
    config and its kernel arguments are worked out on the first call (see ``int4.bind``)."""
    scheme = as_scheme(scheme)
    reason = serves(scheme)
    if reason is not None:
        raise ValueError(f"w8a16_linear: {reason}")
    _, m, n, k = common.prepare_rows(x, qweight, scales, zeros, scheme, "w8a16_linear")
    path = path or common.path_for_m(m)
    dtype, device, has_bias = x.dtype, x.device, bias is not None

    def build(cfg: autotune.KernelConfig, words_ok: bool):
        if cfg.dequant:
            grid = (common.cdiv(n, cfg.block_n), common.cdiv(k, cfg.block_k))
            meta = dict(BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps)

            def dequantize_then_linear(x2, qweight, scales, bias):
                weight = torch.empty((n, k), device=x2.device, dtype=x2.dtype)
                common.kernel(w8_dequantize_kernel)[grid](qweight, scales, weight, n, k, k, k, **meta)
                return torch.nn.functional.linear(x2, weight, None if bias is None else bias.to(x2.dtype))

            return dequantize_then_linear
        grid = (common.cdiv(m, cfg.block_m) * common.cdiv(n, cfg.block_n), cfg.split_k)
        meta = dict(
            HAS_BIAS=has_bias, USE_DOT=path != "gemv", DOT_DTYPE=common.dot_dtype(dtype),
            DOT_PRECISION=common.dot_precision(dtype), SPLIT=cfg.split_k > 1,
            WORDS=bool(cfg.words) and path == "gemv" and words_ok and cfg.block_k % 4 == 0,
            BLOCK_W=max(1, cfg.block_k // 4), EVEN_K=k % cfg.block_k == 0, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

        name = f"the W8A16 kernel ({cfg})"

        def linear(x2, qweight, scales, bias):
            out = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
            work, counts = (common.split_workspace(x2.device, m * n, grid[0]) if cfg.split_k > 1
                            else common.no_workspace(out))  # fmt: skip
            try:
                common.kernel(w8a16_linear_kernel)[grid](
                    x2, qweight, scales, scales if bias is None else bias, out, work, counts,
                    m, n, k, cfg.split_k, x2.stride(0), k, n, **meta,
                )  # fmt: skip
            except Exception as error:
                if not common.fewer_stages(error, meta, name):
                    raise
                return linear(x2, qweight, scales, bias)
            return out

        return linear

    bound = autotune.BoundLaunches(
        lambda: tune_key(scheme.name, path, m, n, k, device), lambda: candidate_configs(path, m, k),
        lambda: default_config(path, m), build, device, config,
    )  # fmt: skip

    def run(x, qweight, scales, zeros, bias) -> torch.Tensor:
        x2 = common.as_rows(x)
        qweight, scales = qweight.contiguous(), scales.reshape(-1).contiguous()
        out = bound(k % 4 == 0 and common.word_aligned(qweight), x2, qweight, scales, bias)
        return common.as_input_shape(out, x)

    run.bound = bound  # its config, for reports
    return run


def w8a16_linear(
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
    """``qcompile::linear`` for ``int8`` and ``fp8`` (weight-only). ``path`` defaults by M."""
    return bind(scheme, x, qweight, scales, zeros, bias, path=path, config=config)(x, qweight, scales, zeros, bias)
