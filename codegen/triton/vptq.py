"""VPTQ weights (``qcompile.schemes.vptq``): a GEMM whose prologue decodes each weight tile by gathering centroids,
then ``tl.dot`` with fp32 accumulation.

Works in quantization order: with ``p = perm``, ``y = x[:, p] @ Wp.T + bias`` where ``Wp[n, j] = W[n, p[j]] =
Q[n, j] * scale[p[j]] + weight_bias[p[j]]``; the activation tile is gathered through ``perm`` (columns ``>= K``
read zero). ``Q`` (module docstring of the scheme): for ``j >= o`` vector row ``i = n // v`` holds column ``c = j -
o``'s ``tb``-bit entry at bit ``c*tb`` of its uint32 words (main index low, residual index high); ``Q[n, j] =
centroids[idx, n % v] + res_centroids[ridx, n % v]``; for ``j < o``, ``outlier_centroids[outlier_indices[i, j], n %
v]``.

:func:`vptq_linear_kernel`: each element of a ``[BLOCK_N, BLOCK_K]`` weight tile loads the one or two words holding
its entry, extracts the indices, loads the centroid values at computed offsets, applies the column's scale and
bias, casts to the dot dtype and multiplies with ``tl.dot`` (fp32 activations at ``ieee`` precision). Small M splits
K across programs (``tiles.store_tile``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.codegen.triton import autotune, common
from qcompile.codegen.triton.rows import cuda_call_reason, cuda_rows
from qcompile.codegen.triton.tiles import load_bias, split_k_range, store_tile, tile_indices, tile_start
from qcompile.runtime.dispatch import KernelEntry
from qcompile.schemes import as_scheme

PRIORITY = 10
TARGET_PROGRAMS = 264


def default_config(m: int, n: int, k: int) -> autotune.KernelConfig:
    """As the AQLM kernel's: 16 x 64 x 64 tiles with K split for small M, 64/128 x 64 x 64 above; the interpreter
    takes 16 x 32 x 32 tiles with K split in two."""
    if common.interpreting():
        split = min(common.cdiv(k, 32), 2) if m <= common.SPLITK_MAX_M else 1
        return autotune.KernelConfig(16, 32, 32, split_k=split, num_stages=1)
    if m <= common.SPLITK_MAX_M:
        split = max(1, min(common.cdiv(k, 64), TARGET_PROGRAMS // common.cdiv(n, 64), 16))
        return autotune.KernelConfig(16, 64, 64, split_k=split, num_warps=4, num_stages=3)
    block_m = 64 if m <= 64 else 128
    return autotune.KernelConfig(block_m, 64, 64, num_warps=4 if block_m == 64 else 8, num_stages=3)


@triton.jit
def weight_tile(idx_ptr, books_ptr, res_ptr, oidx_ptr, obooks_ptr, scale_ptr, wbias_ptr, perm_ptr, offs_n, mask_n,
                k0, K, WORDS, V: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, OUT: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """fp32 ``Wp[offs_n, k0 : k0 + BLOCK_K]`` (quantization order; zero past ``K`` and ``N``) and the tile's
    ``perm`` entries."""
    js = k0 + tl.arange(0, BLOCK_K)
    mask_k = js < K
    mask = mask_n[:, None] & mask_k[None, :]
    rows = (offs_n // V).to(tl.int64)[:, None]
    u = (offs_n % V)[:, None]
    c = tl.maximum(js - OUT, 0)[None, :]
    pos = c.to(tl.int64) * (BK + BR)
    word = rows * WORDS + pos // 32
    shift = pos % 32
    lo = tl.load(idx_ptr + word, mask=mask, other=0).to(tl.int64) & 0xFFFFFFFF
    hi = tl.load(idx_ptr + word + 1, mask=mask & (shift + BK + BR > 32), other=0).to(tl.int64) & 0xFFFFFFFF
    entry = ((lo | (hi << 32)) >> shift) & ((1 << (BK + BR)) - 1)
    main = entry & ((1 << BK) - 1)
    w = tl.load(books_ptr + main * V + u, mask=mask, other=0.0).to(tl.float32)
    if BR > 0:
        res = (entry >> BK) & ((1 << BR) - 1)
        w += tl.load(res_ptr + res * V + u, mask=mask, other=0.0).to(tl.float32)
    if OUT > 0:
        is_out = mask & (js < OUT)[None, :]
        oj = tl.minimum(js, OUT - 1)[None, :]
        oidx = tl.load(oidx_ptr + rows * OUT + oj, mask=is_out, other=0).to(tl.int32) & ((1 << BK) - 1)
        wo = tl.load(obooks_ptr + oidx * V + u, mask=is_out, other=0.0).to(tl.float32)
        w = tl.where((js < OUT)[None, :], wo, w)
    p = tl.load(perm_ptr + js, mask=mask_k, other=0).to(tl.int32) & 0xFFFF
    p = tl.where(p < K, p, 0)
    s = tl.load(scale_ptr + p, mask=mask_k, other=0.0).to(tl.float32)
    b = tl.load(wbias_ptr + p, mask=mask_k, other=0.0).to(tl.float32)
    w = tl.where(mask, w * s[None, :] + b[None, :], 0.0)
    return w, p


@triton.jit
def vptq_linear_kernel(
    x_ptr, idx_ptr, books_ptr, res_ptr, oidx_ptr, obooks_ptr, scale_ptr, wbias_ptr, perm_ptr, bias_ptr, out_ptr,
    work_ptr, count_ptr, M, N, K, WORDS, SPLIT_K, stride_xm, stride_om,
    V: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``out[M, N] = x[M, K] @ W[N, K].T + bias[N]``. Grid: ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K)``."""
    pid_m, pid_n = tile_indices(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_begin, k_end = split_k_range(K, SPLIT_K, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_tile = tile_start(k0, BLOCK_K)
        w, p = weight_tile(idx_ptr, books_ptr, res_ptr, oidx_ptr, obooks_ptr, scale_ptr, wbias_ptr, perm_ptr, offs_n,
                           mask_n, k_tile, K, WORDS, V, BK, BR, OUT, BLOCK_N, BLOCK_K)  # fmt: skip
        ks = k_tile + offs_k
        a = tl.load(x_rows + p[None, :], mask=mask_m[:, None] & (ks[None, :] < K), other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=DOT_PRECISION)
    y = acc + load_bias(bias_ptr, offs_n, N, HAS_BIAS, BLOCK_N)
    store_tile(out_ptr, y, offs_m, offs_n, M, N, stride_om, work_ptr, count_ptr, SPLIT_K, SPLIT)


def bind(scheme, x, packed, bias, out_features, *, config: autotune.KernelConfig | None = None):
    """``launch(x, packed, bias) -> y`` for calls with this one's signature (shapes, dtypes, scheme)."""
    scheme = as_scheme(scheme)
    if scheme.family != "vptq":
        raise ValueError(f"vptq_linear: {scheme.name} is a {scheme.family} scheme")
    where = f"vptq_linear({scheme.name})"
    common.check_activation(x, where)
    n, k = out_features, x.shape[-1]
    scheme.check_packed(packed, n, k, where=where)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{where}: bias is {list(bias.shape)}, expected [{n}]")
    m = x.numel() // k
    cfg = config or default_config(m, n, k)
    if min(cfg.block_m, cfg.block_n, cfg.block_k) < 16:
        raise ValueError(f"{where}: config {cfg.label} needs blocks >= 16")
    dtype = x.dtype
    grid = (common.cdiv(m, cfg.block_m) * common.cdiv(n, cfg.block_n), cfg.split_k)
    meta = dict(
        V=scheme.vector_len, BK=scheme.index_bits, BR=scheme.res_bits, OUT=scheme.outliers, HAS_BIAS=bias is not None,
        SPLIT=cfg.split_k > 1, DOT_DTYPE=common.dot_dtype(dtype), DOT_PRECISION=common.dot_precision(dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    name = f"the VPTQ kernel ({cfg.label})"
    words = scheme.index_words(k)

    def gemm(x2, tensors, bias):
        out = torch.empty((m, n), device=x2.device, dtype=dtype)
        if m == 0:
            return out
        t = dict(zip((s.name for s in scheme.tensors(n, k)), tensors))
        idx, books = t["indices"], t["centroids"]
        res, oidx, obooks = t.get("res_centroids", books), t.get("outlier_indices", idx), t.get("outlier_centroids",
                                                                                                 books)  # fmt: skip
        work, counts = (common.split_workspace(x2.device, m * n, grid[0]) if cfg.split_k > 1
                        else common.no_workspace(out))  # fmt: skip
        try:
            common.kernel(vptq_linear_kernel)[grid](
                x2, idx, books, res, oidx, obooks, t["weight_scale"], t["weight_bias"], t["perm"],
                books if bias is None else bias, out, work, counts, m, n, k, words, cfg.split_k, x2.stride(0),
                out.stride(0), **meta,
            )  # fmt: skip
        except Exception as error:
            if not common.fewer_stages(error, meta, name):
                raise
            return gemm(x2, tensors, bias)
        return out

    def launch(x, packed, bias):
        return common.as_input_shape(gemm(common.as_rows(x), [t.contiguous() for t in packed], bias), x)

    return launch


def vptq_linear(x: torch.Tensor, packed, bias: torch.Tensor | None, scheme, out_features: int, *,
                config: autotune.KernelConfig | None = None) -> torch.Tensor:  # fmt: skip
    """``qcompile::linear`` for a ``vptq`` scheme (object or name): ``x [..., K]`` → ``[..., N]`` in ``x.dtype``."""
    return bind(scheme, x, packed, bias, out_features, config=config)(x, packed, bias)


def supports(scheme, x, packed) -> str | None:
    """``None`` when the Triton VPTQ kernel serves the call, else why not."""
    return cuda_call_reason(x, packed)


def kernel_entries(family: str) -> list[KernelEntry]:
    """The Triton VPTQ row (CUDA only; none when triton cannot be imported)."""
    return cuda_rows(family, "vptq", "triton-vptq", supports, bind, PRIORITY)
