"""HIGGS weights (``qcompile.schemes.higgs``): the activation rotated by a Walsh–Hadamard kernel, then a GEMM whose
prologue decodes grid indices into grid values times the group's scale, then ``tl.dot``.

Reads the canonical packed layout directly (``Kp`` = K padded to the Hadamard block ``h``; ``p`` elements per vector,
``b`` bits per weight, codes of ``c = p*b`` bits, ``g = min(256, h)`` elements per scale)::

    qweight uint8   [N, Kp * b / 8]   code v of a row: c = 2, 4, 8: bits (v % (8/c)) * c.. of byte v / (8/c);
                                      c = 3, 6: bits (v % (24/c)) * c.. of the little-endian 24-bit word of bytes
                                      3u..3u+2, u = v / (24/c)
    scales  float16 [N, Kp / g]
    Wr[n, k] = grid[code[n, k / p] * p + k % p] * scales[n, k / g]          (the rotated basis)

1. :func:`higgs_rotate_kernel`: ``xr = x_p @ Hb`` per block of ``h``: the block (zero past ``K``) is held in
   registers and transformed by ``log2(h)`` constant-geometry (Pease) butterfly stages, ``y[i] = v[2i] + v[2i+1]``,
   ``y[i + h/2] = v[2i] - v[2i+1]``: each stage the same reshape / split / join, and after ``log2(h)`` of them the
   result is the Sylvester-ordered transform; then ``1 / sqrt(h)``. ``O(K log h)``, fp32.
2. :func:`higgs_linear_kernel`: each ``[BLOCK_N, BLOCK_K]`` weight tile is decoded from its bytes (each element reads
   the byte or three bytes holding its vector's code), looked up in the grid (``2**c * p`` fp32 values, at most 2 KiB:
   loads that the L1 cache serves after the first), times the float16 group scale in fp32, cast to the dot dtype and
   multiplied with ``tl.dot`` (fp32 accumulation; fp32 activations at ``ieee`` precision). Small M splits K across
   programs (``tiles.store_tile``).

Order of this file: configs, the kernels, the launchers, the dispatch row.
"""

from __future__ import annotations

import functools

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
#: elements of x one rotation program holds (BLOCK_M rows of one Hadamard block)
ROTATE_ELEMENTS = 4096


# -- configs ----------------------------------------------------------------------------------------------------------
def default_config(m: int, n: int, kp: int) -> autotune.KernelConfig:
    """Up to ``SPLITK_MAX_M`` rows: 16 x 64 x 64 tiles, K split until about ``TARGET_PROGRAMS`` programs stream the
    weight; more rows: 64 or 128 x 64 x 64. The interpreter takes 16 x 32 x 32 tiles with K split in two."""
    if common.interpreting():
        split = min(common.cdiv(kp, 32), 2) if m <= common.SPLITK_MAX_M else 1
        return autotune.KernelConfig(16, 32, 32, split_k=split, num_stages=1)
    if m <= common.SPLITK_MAX_M:
        split = max(1, min(common.cdiv(kp, 64), TARGET_PROGRAMS // common.cdiv(n, 64), 16))
        return autotune.KernelConfig(16, 64, 64, split_k=split, num_warps=4, num_stages=3)
    block_m = 64 if m <= 64 else 128
    return autotune.KernelConfig(block_m, 64, 64, num_warps=4 if block_m == 64 else 8, num_stages=3)


# -- kernels ----------------------------------------------------------------------------------------------------------
@triton.jit
def higgs_rotate_kernel(x_ptr, out_ptr, M, K, stride_xm, stride_om, norm,
                        H: tl.constexpr, LOG2H: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """``out[m, blk*H : (blk+1)*H] = x_p[m, blk*H : (blk+1)*H] @ H_norm`` (``x_p``: ``x [M, K]`` zero past ``K``;
    ``norm = 1 / sqrt(H)``). Grid: ``(cdiv(M, BLOCK_M), Kp / H)``; ``out`` ``[M, Kp]`` in its own dtype."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * H + tl.arange(0, H)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)[:, None]
    v = tl.load(x_ptr + rows * stride_xm + offs_k[None, :], mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
    v = v.to(tl.float32)
    for _ in tl.static_range(LOG2H):
        a, b = tl.split(tl.reshape(v, (BLOCK_M, H // 2, 2)))  # a = v[2i], b = v[2i + 1]
        v = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (BLOCK_M, H))  # sums first, then differences
    v = v * norm
    tl.store(out_ptr + rows * stride_om + offs_k[None, :], v.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])


@triton.jit
def weight_tile(qweight_ptr, scales_ptr, grid_ptr, offs_n, mask_n, k0, KP, stride_qn, stride_sn,
                P: tl.constexpr, CODE_BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """fp32 ``Wr[offs_n, k0 : k0 + BLOCK_K]`` (``[BLOCK_N, BLOCK_K]``; zero past ``KP`` and ``N``)."""
    ks = k0 + tl.arange(0, BLOCK_K)
    mask = mask_n[:, None] & (ks[None, :] < KP)
    row = qweight_ptr + offs_n.to(tl.int64)[:, None] * stride_qn
    v = ks // P  # the vector (code) of each element
    if CODE_BITS == 3 or CODE_BITS == 6:
        unit = (v // (24 // CODE_BITS)) * 3
        word = tl.load(row + unit[None, :], mask=mask, other=0).to(tl.int32)
        word |= tl.load(row + unit[None, :] + 1, mask=mask, other=0).to(tl.int32) << 8
        word |= tl.load(row + unit[None, :] + 2, mask=mask, other=0).to(tl.int32) << 16
        code = (word >> ((v % (24 // CODE_BITS)) * CODE_BITS)[None, :]) & ((1 << CODE_BITS) - 1)
    else:
        byte = tl.load(row + (v // (8 // CODE_BITS))[None, :], mask=mask, other=0).to(tl.int32)
        code = (byte >> ((v % (8 // CODE_BITS)) * CODE_BITS)[None, :]) & ((1 << CODE_BITS) - 1)
    value = tl.load(grid_ptr + code * P + (ks % P)[None, :])
    scale_ptrs = scales_ptr + offs_n.to(tl.int64)[:, None] * stride_sn + (ks // GROUP)[None, :]
    scale = tl.load(scale_ptrs, mask=mask, other=0.0).to(tl.float32)
    return value * scale


@triton.jit
def higgs_linear_kernel(
    xr_ptr, qweight_ptr, scales_ptr, grid_ptr, bias_ptr, out_ptr, work_ptr, count_ptr,
    M, N, KP, SPLIT_K, stride_xm, stride_qn, stride_sn, stride_om,
    P: tl.constexpr, CODE_BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``out[M, N] = xr[M, KP] @ Wr[N, KP].T + bias[N]`` (``Wr`` decoded as in the module docstring).
    Grid: ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K)``; blocks ``>= 16``."""
    pid_m, pid_n = tile_indices(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_begin, k_end = split_k_range(KP, SPLIT_K, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    x_rows = xr_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_tile = tile_start(k0, BLOCK_K)
        ks = k_tile + offs_k
        a = tl.load(x_rows + ks[None, :], mask=mask_m[:, None] & (ks[None, :] < KP), other=0.0)
        w = weight_tile(qweight_ptr, scales_ptr, grid_ptr, offs_n, mask_n, k_tile, KP, stride_qn, stride_sn, P,
                        CODE_BITS, GROUP, BLOCK_K)  # fmt: skip
        acc = tl.dot(a.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=DOT_PRECISION)
    y = acc + load_bias(bias_ptr, offs_n, N, HAS_BIAS, BLOCK_N)
    store_tile(out_ptr, y, offs_m, offs_n, M, N, stride_om, work_ptr, count_ptr, SPLIT_K, SPLIT)


# -- launchers --------------------------------------------------------------------------------------------------------
@functools.cache
def grid_values(p: int, b: int, device: torch.device) -> torch.Tensor:
    """The grid of ``(p, b)`` flattened, fp32 ``[2**(p*b) * p]`` (point ``i`` at ``i*p .. i*p+p-1``), made once per
    device."""
    from qcompile.schemes.higgs import grid

    return grid(p, b, torch.float32, device).reshape(-1).contiguous()


def rotate(x2: torch.Tensor, kp: int, h: int, dtype: torch.dtype) -> torch.Tensor:
    """``x_p @ Hb`` ``[M, kp]`` in ``dtype`` from ``x2 [M, K]`` (rows with unit stride), by
    :func:`higgs_rotate_kernel`."""
    m, k = x2.shape
    out = torch.empty((m, kp), device=x2.device, dtype=dtype)
    if m:
        block_m = max(1, min(16, ROTATE_ELEMENTS // h))
        common.kernel(higgs_rotate_kernel)[(common.cdiv(m, block_m), kp // h)](
            x2, out, m, k, x2.stride(0), out.stride(0), h**-0.5, H=h, LOG2H=h.bit_length() - 1, BLOCK_M=block_m,
        )  # fmt: skip
    return out


def check_packed(scheme, packed, n: int, k: int, where: str) -> None:
    """The packed tensors against the scheme's declaration (``ValueError`` naming the tensor, expected and got)."""
    scheme.check_packed(packed, n, k, where=where)


def bind(scheme, x, packed, bias, out_features, *, config: autotune.KernelConfig | None = None):
    """``launch(x, packed, bias) -> y`` for calls with this one's signature (shapes, dtypes, scheme)."""
    scheme = as_scheme(scheme)
    if scheme.family != "higgs":
        raise ValueError(f"higgs_linear: {scheme.name} is a {scheme.family} scheme")
    where = f"higgs_linear({scheme.name})"
    common.check_activation(x, where)
    n, k = out_features, x.shape[-1]
    kp = scheme.padded_in_features(k)
    check_packed(scheme, packed, n, k, where)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{where}: bias is {list(bias.shape)}, expected [{n}]")
    m = x.numel() // k
    cfg = config or default_config(m, n, kp)
    if min(cfg.block_m, cfg.block_n, cfg.block_k) < 16:
        raise ValueError(f"{where}: config {cfg.label} needs blocks >= 16")
    dtype = x.dtype
    dot = common.dot_dtype(dtype)
    rotated_dtype = torch.float32 if dot == tl.float32 else dtype
    grid = (common.cdiv(m, cfg.block_m) * common.cdiv(n, cfg.block_n), cfg.split_k)
    meta = dict(
        P=scheme.dim, CODE_BITS=scheme.code_bits, GROUP=scheme.group, HAS_BIAS=bias is not None,
        SPLIT=cfg.split_k > 1, DOT_DTYPE=dot, DOT_PRECISION=common.dot_precision(dtype), BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    name = f"the HIGGS kernel ({cfg.label})"

    def gemm(xr, qweight, scales, bias):
        out = torch.empty((m, n), device=xr.device, dtype=dtype)
        if m == 0:
            return out
        work, counts = (common.split_workspace(xr.device, m * n, grid[0]) if cfg.split_k > 1
                        else common.no_workspace(out))  # fmt: skip
        try:
            common.kernel(higgs_linear_kernel)[grid](
                xr, qweight, scales, grid_values(scheme.dim, scheme.bits, xr.device), scales if bias is None else bias,
                out, work, counts, m, n, kp, cfg.split_k, xr.stride(0), qweight.stride(0), scales.stride(0),
                out.stride(0), **meta,
            )  # fmt: skip
        except Exception as error:
            if not common.fewer_stages(error, meta, name):
                raise
            return gemm(xr, qweight, scales, bias)
        return out

    def launch(x, packed, bias):
        xr = rotate(common.as_rows(x), kp, scheme.hadamard, rotated_dtype)
        out = gemm(xr, packed[0].contiguous(), packed[1].contiguous(), bias)
        return common.as_input_shape(out, x)

    return launch


def higgs_linear(x: torch.Tensor, packed, bias: torch.Tensor | None, scheme, *,
                 config: autotune.KernelConfig | None = None) -> torch.Tensor:  # fmt: skip
    """``qcompile::linear`` for a ``higgs`` scheme (object or name): ``x [..., K]`` → ``[..., N]`` in ``x.dtype``."""
    n = packed[0].shape[0] if len(packed) else 0
    return bind(scheme, x, packed, bias, n, config=config)(x, packed, bias)


# -- dispatch row -----------------------------------------------------------------------------------------------------
def supports(scheme, x, packed) -> str | None:
    """``None`` when the Triton HIGGS kernel serves the call, else why not."""
    return cuda_call_reason(x, packed)


def kernel_entries(family: str) -> list[KernelEntry]:
    """The Triton HIGGS row (CUDA only; none when triton cannot be imported)."""
    return cuda_rows(family, "higgs", "triton-higgs", supports, bind, PRIORITY)
