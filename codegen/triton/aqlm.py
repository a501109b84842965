"""AQLM weights (``qcompile.schemes.aqlm``): a GEMM whose prologue decodes each weight tile from its codes by
gathering codebook values, then ``tl.dot`` with fp32 accumulation.

Reads the canonical packed layout directly (``Kp`` = K padded to a multiple of ``ig``, ``G = Kp / ig``, ``E = 2**B``)::

    codes     int8 / int16  [N, G, M]      stored signed: the entry is value mod E (value & (E - 1))
    codebooks float16       [M, E, 1, ig]
    scales    float16       [N, 1, 1, 1]
    W[n, k] = scales[n] * sum_m codebooks[m, codes[n, k / ig, m] mod E, 0, k % ig]

:func:`aqlm_linear_kernel`: each element of a ``[BLOCK_N, BLOCK_K]`` weight tile loads its group's ``M`` codes (the
``ig`` elements of a group read the same ones: served by the cache) and the codebook values at computed offsets
(``tl.load`` of ``codebooks + (m*E + code)*ig + k % ig``), sums them in fp32, times the row's scale, casts to the dot
dtype and multiplies with ``tl.dot`` (fp32 activations at ``ieee`` precision). Activations columns past ``K`` are
masked to zero. Small M splits K across programs (``tiles.store_tile``).

Order of this file: configs, the kernel, the launchers, the dispatch row.
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
#: programs a small-M launch aims for (an H100/H200 has 132 SMs), reached by splitting K
TARGET_PROGRAMS = 264


# -- configs ----------------------------------------------------------------------------------------------------------
def default_config(m: int, n: int, kp: int) -> autotune.KernelConfig:
    """Up to ``SPLITK_MAX_M`` rows: 16 x 64 x 64 tiles, K split until about ``TARGET_PROGRAMS`` programs; more rows:
    64 or 128 x 64 x 64. The interpreter takes 16 x 32 x 32 tiles with K split in two."""
    if common.interpreting():
        split = min(common.cdiv(kp, 32), 2) if m <= common.SPLITK_MAX_M else 1
        return autotune.KernelConfig(16, 32, 32, split_k=split, num_stages=1)
    if m <= common.SPLITK_MAX_M:
        split = max(1, min(common.cdiv(kp, 64), TARGET_PROGRAMS // common.cdiv(n, 64), 16))
        return autotune.KernelConfig(16, 64, 64, split_k=split, num_warps=4, num_stages=3)
    block_m = 64 if m <= 64 else 128
    return autotune.KernelConfig(block_m, 64, 64, num_warps=4 if block_m == 64 else 8, num_stages=3)


# -- kernel -----------------------------------------------------------------------------------------------------------
@triton.jit
def weight_tile(codes_ptr, books_ptr, scales_ptr, offs_n, mask_n, k0, KP, NUM_CB: tl.constexpr,
                ENTRIES: tl.constexpr, IG: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """fp32 ``W[offs_n, k0 : k0 + BLOCK_K]`` (``[BLOCK_N, BLOCK_K]``; zero past ``KP`` and ``N``)."""
    ks = k0 + tl.arange(0, BLOCK_K)
    mask = mask_n[:, None] & (ks[None, :] < KP)
    groups = KP // IG
    at = (offs_n.to(tl.int64)[:, None] * groups + (ks // IG)[None, :]) * NUM_CB
    w = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m in tl.static_range(NUM_CB):
        code = tl.load(codes_ptr + at + m, mask=mask, other=0).to(tl.int32) & (ENTRIES - 1)
        value = tl.load(books_ptr + (m * ENTRIES + code) * IG + (ks % IG)[None, :], mask=mask, other=0.0)
        w += value.to(tl.float32)
    scale = tl.load(scales_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    return w * scale[:, None]


@triton.jit
def aqlm_linear_kernel(
    x_ptr, codes_ptr, books_ptr, scales_ptr, bias_ptr, out_ptr, work_ptr, count_ptr,
    M, N, K, KP, SPLIT_K, stride_xm, stride_om,
    NUM_CB: tl.constexpr, ENTRIES: tl.constexpr, IG: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``out[M, N] = x[M, K] @ W[N, K].T + bias[N]`` (``W`` decoded as in the module docstring).
    Grid: ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K)``; blocks ``>= 16``."""
    pid_m, pid_n = tile_indices(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_begin, k_end = split_k_range(KP, SPLIT_K, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_tile = tile_start(k0, BLOCK_K)
        ks = k_tile + offs_k
        a = tl.load(x_rows + ks[None, :], mask=mask_m[:, None] & (ks[None, :] < K), other=0.0)
        w = weight_tile(codes_ptr, books_ptr, scales_ptr, offs_n, mask_n, k_tile, KP, NUM_CB, ENTRIES, IG, BLOCK_N,
                        BLOCK_K)  # fmt: skip
        acc = tl.dot(a.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=DOT_PRECISION)
    y = acc + load_bias(bias_ptr, offs_n, N, HAS_BIAS, BLOCK_N)
    store_tile(out_ptr, y, offs_m, offs_n, M, N, stride_om, work_ptr, count_ptr, SPLIT_K, SPLIT)


# -- launchers --------------------------------------------------------------------------------------------------------
def bind(scheme, x, packed, bias, out_features, *, config: autotune.KernelConfig | None = None):
    """``launch(x, packed, bias) -> y`` for calls with this one's signature (shapes, dtypes, scheme)."""
    scheme = as_scheme(scheme)
    if scheme.family != "aqlm":
        raise ValueError(f"aqlm_linear: {scheme.name} is a {scheme.family} scheme")
    where = f"aqlm_linear({scheme.name})"
    common.check_activation(x, where)
    n, k = out_features, x.shape[-1]
    kp = scheme.padded_in_features(k)
    scheme.check_packed(packed, n, k, where=where)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{where}: bias is {list(bias.shape)}, expected [{n}]")
    m = x.numel() // k
    cfg = config or default_config(m, n, kp)
    if min(cfg.block_m, cfg.block_n, cfg.block_k) < 16:
        raise ValueError(f"{where}: config {cfg.label} needs blocks >= 16")
    dtype = x.dtype
    grid = (common.cdiv(m, cfg.block_m) * common.cdiv(n, cfg.block_n), cfg.split_k)
    meta = dict(
        NUM_CB=scheme.num_codebooks, ENTRIES=scheme.entries, IG=scheme.group_size, HAS_BIAS=bias is not None,
        SPLIT=cfg.split_k > 1, DOT_DTYPE=common.dot_dtype(dtype), DOT_PRECISION=common.dot_precision(dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    name = f"the AQLM kernel ({cfg.label})"

    def gemm(x2, codes, books, scales, bias):
        out = torch.empty((m, n), device=x2.device, dtype=dtype)
        if m == 0:
            return out
        work, counts = (common.split_workspace(x2.device, m * n, grid[0]) if cfg.split_k > 1
                        else common.no_workspace(out))  # fmt: skip
        try:
            common.kernel(aqlm_linear_kernel)[grid](
                x2, codes, books, scales, scales if bias is None else bias, out, work, counts, m, n, k, kp,
                cfg.split_k, x2.stride(0), out.stride(0), **meta,
            )  # fmt: skip
        except Exception as error:
            if not common.fewer_stages(error, meta, name):
                raise
            return gemm(x2, codes, books, scales, bias)
        return out

    def launch(x, packed, bias):
        codes, books, scales = (t.contiguous() for t in packed)
        return common.as_input_shape(gemm(common.as_rows(x), codes, books, scales, bias), x)

    return launch


def aqlm_linear(x: torch.Tensor, packed, bias: torch.Tensor | None, scheme, *,
                config: autotune.KernelConfig | None = None) -> torch.Tensor:  # fmt: skip
    """``qcompile::linear`` for an ``aqlm`` scheme (object or name): ``x [..., K]`` → ``[..., N]`` in ``x.dtype``."""
    n = packed[0].shape[0] if len(packed) else 0
    return bind(scheme, x, packed, bias, n, config=config)(x, packed, bias)


# -- dispatch row -----------------------------------------------------------------------------------------------------
def supports(scheme, x, packed) -> str | None:
    """``None`` when the Triton AQLM kernel serves the call, else why not."""
    return cuda_call_reason(x, packed)


def kernel_entries(family: str) -> list[KernelEntry]:
    """The Triton AQLM row (CUDA only; none when triton cannot be imported)."""
    return cuda_rows(family, "aqlm", "triton-aqlm", supports, bind, PRIORITY)
