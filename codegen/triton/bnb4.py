"""bitsandbytes' 4-bit state (``bnb4``: ``bnb-nf4``, ``bnb-fp4``, ``-dq``, ``-b<B>``): codes dequantized in the GEMM
prologue from the flattened layout, then ``tl.dot``.

Reads the packed state as the scheme declares it (:mod:`qcompile.schemes.bnb4`)::

    qweight uint8 [ceil(N K / 2)]   element f = n K + k: the high nibble of byte f // 2 when f is even, else the low
    absmax  float32 [n_blocks]       w[f] = table[code] * absmax[f // B]
    -dq:    absmax uint8 [n_blocks], nested_absmax float32 [ceil(n_blocks / 256)], nested_offset float32 [1]
            absmax[b] = map[absmax_code[b]] * nested_absmax[b // 256] + nested_offset

Each ``[BLOCK_N, BLOCK_K]`` weight tile is gathered element by element from the flat index ``n K + k`` (a row may
start in the middle of a byte and a block may cross rows, so no tile is a rectangle of bytes): one byte load and one
table load (16 float32 levels) per element, one scale load per element (a block is 32 or more elements, so these hit
cache). The fp32 weights are cast to the activation's dtype for ``tl.dot`` with fp32 accumulation (fp32 activations:
``ieee`` products). On a GPU the compiler may fuse the ``-dq`` product and offset into one FMA, which moves a block
scale by at most one float32 rounding from the reference's; the interpreter computes them apart, as the reference.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from qcompile.codegen.triton import autotune, common
from qcompile.codegen.triton.rows import cuda_call_reason, cuda_rows
from qcompile.codegen.triton.tiles import load_bias, split_k_range, store_tile, tile_indices
from qcompile.runtime.dispatch import KernelEntry
from qcompile.schemes import as_scheme
from qcompile.schemes import bnb_blockwise as blockwise

FAMILY = "bnb4"
PRIORITY = 10
#: programs a small-M launch aims for (an H100/H200 has 132 SMs), reached by splitting K
TARGET_PROGRAMS = 264


# -- configs ------------------------------------------------------------------------------------------------------
def default_config(m: int, n: int, k: int) -> autotune.KernelConfig:
    """Up to ``SPLITK_MAX_M`` rows: 16 x 64 x 128 tiles with K split until about ``TARGET_PROGRAMS`` programs run.
    More rows: 64 or 128 x 64 x 64 tiles. The interpreter takes 16 x 32 x 32 tiles with K split in two."""
    if common.interpreting():
        return autotune.KernelConfig(16, 32, 32, split_k=min(common.cdiv(k, 32), 2), num_stages=1)
    if m <= common.SPLITK_MAX_M:
        k_tiles = common.cdiv(k, 128)
        split = max(1, min(k_tiles, TARGET_PROGRAMS // common.cdiv(n, 64), 16))
        return autotune.KernelConfig(16, 64, 128, split_k=split, num_warps=4, num_stages=3)
    block_m = 64 if m <= 64 else 128
    return autotune.KernelConfig(block_m, 64, 64, num_warps=4 if block_m == 64 else 8, num_stages=3)


# -- the kernel ---------------------------------------------------------------------------------------------------
@triton.jit
def weight_tile(q_ptr, absmax_ptr, nested_ptr, offset_ptr, map_ptr, table_ptr, rows, ks, mask,
                SHIFT: tl.constexpr, DQ: tl.constexpr):  # fmt: skip
    """fp32 ``w[n, k]`` at the flat indices ``rows[:, None] + ks[None, :]`` (``rows = n K``, int64); 0 off ``mask``."""
    f = rows[:, None] + ks[None, :]
    byte = tl.load(q_ptr + (f >> 1), mask=mask, other=0).to(tl.int32)
    code = tl.where((f & 1) == 0, byte >> 4, byte & 15)
    level = tl.load(table_ptr + code)
    block = f >> SHIFT
    if DQ:
        coded = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        product = tl.load(map_ptr + coded) * tl.load(nested_ptr + (block >> 8), mask=mask, other=0.0)
        scale = product + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return tl.where(mask, level * scale, 0.0)


@triton.jit
def bnb4_linear_kernel(
    x_ptr, q_ptr, absmax_ptr, nested_ptr, offset_ptr, map_ptr, table_ptr, bias_ptr, out_ptr, work_ptr, count_ptr,
    M, N, K, SPLIT_K, stride_xm, stride_om,
    SHIFT: tl.constexpr, DQ: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``out[M, N] = x[M, K] @ w[N, K].T + bias[N]`` with ``w`` decoded from bitsandbytes' flat 4-bit state (see the
    module docstring; ``SHIFT = log2(B)``, ``DQ`` for double quantization). ``x`` fp16/bf16/fp32 rows; ``table``
    fp32 ``[16]``, ``map`` fp32 ``[256]``; ``out`` ``[M, N]``. Grid: ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),
    SPLIT_K)``; split-K partial sums meet in the fp32 workspace (``tiles.store_tile``)."""
    pid_m, pid_n = tile_indices(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_begin, k_end = split_k_range(K, SPLIT_K, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    rows = offs_n.to(tl.int64) * K
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + offs_k
        in_k = ks < K
        a = tl.load(x_rows + ks[None, :], mask=mask_m[:, None] & in_k[None, :], other=0.0)
        w = weight_tile(q_ptr, absmax_ptr, nested_ptr, offset_ptr, map_ptr, table_ptr, rows, ks,
                        mask_n[:, None] & in_k[None, :], SHIFT, DQ)  # fmt: skip
        acc = tl.dot(a.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=DOT_PRECISION)
    y = acc + load_bias(bias_ptr, offs_n, N, HAS_BIAS, BLOCK_N)
    store_tile(out_ptr, y, offs_m, offs_n, M, N, stride_om, work_ptr, count_ptr, SPLIT_K, SPLIT)


# -- launchers ----------------------------------------------------------------------------------------------------
@functools.cache
def constants(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(table fp32 [16], dynamic map fp32 [256])`` on ``device``, made once per device."""
    return blockwise.table(quant_type, device), blockwise.dynamic_map(device)


def bind(scheme, x, packed, bias, out_features, *, config: autotune.KernelConfig | None = None):
    """``launch(x, packed, bias) -> y`` for calls with this one's signature; the packed tensors are checked against
    the scheme's declaration and the config worked out once."""
    scheme = as_scheme(scheme)
    if scheme.family != FAMILY:
        raise ValueError(f"bnb4_linear: {scheme.name} is a {scheme.family} scheme, expected {FAMILY}")
    where = f"bnb4_linear({scheme.name})"
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
        SHIFT=scheme.blocksize.bit_length() - 1, DQ=scheme.double_quant, HAS_BIAS=bias is not None,
        SPLIT=cfg.split_k > 1, DOT_DTYPE=common.dot_dtype(dtype), DOT_PRECISION=common.dot_precision(dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    name = f"the bnb4 kernel ({cfg.label})"

    def launch(x, packed, bias):
        x2 = common.as_rows(x)
        out = torch.empty((m, n), device=x2.device, dtype=dtype)
        if m == 0:
            return common.as_input_shape(out, x)
        table, dynamic = constants(scheme.quant_type, x2.device)
        qweight, absmax = packed[0], packed[1]
        nested, offset = (packed[2], packed[3]) if scheme.double_quant else (absmax, absmax)
        work, counts = (common.split_workspace(x2.device, m * n, grid[0]) if cfg.split_k > 1
                        else common.no_workspace(out))  # fmt: skip
        while True:
            try:
                common.kernel(bnb4_linear_kernel)[grid](
                    x2, qweight, absmax, nested, offset, dynamic, table, table if bias is None else bias, out, work,
                    counts, m, n, k, cfg.split_k, x2.stride(0), out.stride(0), **meta,
                )  # fmt: skip
                return common.as_input_shape(out, x)
            except Exception as error:
                if not common.fewer_stages(error, meta, name):
                    raise

    return launch


def bnb4_linear(x: torch.Tensor, packed, bias: torch.Tensor | None, scheme, out_features: int, *,
                config: autotune.KernelConfig | None = None) -> torch.Tensor:  # fmt: skip
    """``qcompile::linear`` for ``bnb4`` schemes: ``x [..., K]`` → ``[..., N]`` in ``x.dtype``; ``packed`` the
    scheme's tensor list (``N = out_features``: the flat codes do not say it); ``config`` replaces
    :func:`default_config`."""
    return bind(scheme, x, packed, bias, out_features, config=config)(x, packed, bias)


# -- dispatch rows ------------------------------------------------------------------------------------------------
def supports(scheme, x, packed) -> str | None:
    """``None`` when the Triton bnb4 kernel serves the call, else why not."""
    return cuda_call_reason(x, packed)


def kernel_entries(family: str) -> list[KernelEntry]:
    """The Triton bnb4 row (CUDA only; none when triton cannot be imported)."""
    return cuda_rows(family, FAMILY, "triton-bnb4", supports, bind, PRIORITY)
