"""SpQR weights (``qcompile.schemes.spqr``): a GEMM whose prologue decodes the 3-bit tiles, then a small kernel adding
the CSR outliers.

Reads the packed layout directly (``Kp`` = K padded to 16, ``G = Kp / 16`` tiles per tile row)::

    dense_weights int64 [ceil(N/16) * G * 16]  word (t*G + g)*16 + i = row 16t+i of tile (t, g): bits 0-2 qs, 3-5 qz,
                                               6+3c.. code of column 16g+c, 54-61 byte i/2 of the tile's float16
                                               (ss, zs, sz, zz) word
    row_offsets   int32 [N + 1]; col_vals int32 [nnz] (float16 value << 16 | permuted column); in_perm int32 [Kp/2]
    D[r, j] = h(h(ss * h(qs - sz)) * h(q - h(zs * h(qz - zz))))      h: rounding to float16, as spqr_quant computes

1. :func:`spqr_dense_kernel`: one program per ``BLOCK_M`` tokens and one tile row (16 output rows). Per step of
   ``TILES`` tiles it loads the ``TILES x 16`` words, rebuilds each tile's statistics from the even rows' bytes (rows
   2b and 2b+1 hold the same byte b), decodes the ``16 x 16 TILES`` weights in float16 steps (float32 values), gathers
   the activation columns through ``in_perm`` (0 past ``K``) and multiplies with ``tl.dot`` (float32, ``ieee``).
2. :func:`spqr_outlier_kernel`: one program per ``BLOCK_M`` tokens and output row: walks the row's outliers and adds
   ``value * x[m, perm[column]]`` to the float32 result of 1 (each output belongs to one program: no atomics).
The result is cast to the activation's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.codegen.triton import common
from qcompile.codegen.triton.rows import cuda_call_reason, cuda_rows
from qcompile.runtime.dispatch import KernelEntry
from qcompile.schemes import as_scheme
from qcompile.schemes.spqr import TILE

PRIORITY = 10
NAMES = ("dense_weights", "row_offsets", "col_vals", "in_perm")


@triton.jit
def _f16(v):
    """float32 ``v`` rounded to float16 (nearest even), as float32."""
    return v.to(tl.float16).to(tl.float32)


@triton.jit
def _half_bits(bits):
    """int64 holding 16 float16 bits → float32."""
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _feature(in_perm_ptr, j, mask):
    """``perm[j]`` (int64) for permuted columns ``j``."""
    word = tl.load(in_perm_ptr + j // 2, mask=mask, other=0).to(tl.int64) & 0xFFFFFFFF
    return (word >> ((j % 2) * 16)) & 0xFFFF


@triton.jit
def spqr_dense_kernel(x_ptr, words_ptr, perm_ptr, bias_ptr, out_ptr, M, N, K, KP, stride_xm, stride_om,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, TILES: tl.constexpr):  # fmt: skip
    pid_m = tl.program_id(0)
    t = tl.program_id(1)
    BLOCK_K: tl.constexpr = TILES * 16
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.arange(0, 16)
    cols = tl.arange(0, 16)
    tiles = tl.arange(0, TILES)
    G = KP // 16
    shifts = ((rows // 2) * 8).to(tl.int64)
    even = (rows % 2) == 0
    acc = tl.zeros((BLOCK_M, 16), dtype=tl.float32)
    for g0 in range(0, G, TILES):
        g = g0 + tiles
        words = tl.load(words_ptr + ((t * G + g) * 16)[:, None] + rows[None, :], mask=(g < G)[:, None], other=0)
        part = tl.where(even[None, :], ((words >> 54) & 0xFF) << shifts[None, :], 0)
        second = tl.sum(part, axis=1)  # [TILES] int64: the tile's four float16
        ss = _half_bits(second & 0xFFFF)[:, None]
        zs = _half_bits((second >> 16) & 0xFFFF)[:, None]
        sz = _half_bits((second >> 32) & 0xFFFF)[:, None]
        zz = _half_bits((second >> 48) & 0xFFFF)[:, None]
        scale = _f16(ss * _f16((words & 7).to(tl.float32) - sz))  # [TILES, 16 rows]
        zero = _f16(zs * _f16(((words >> 3) & 7).to(tl.float32) - zz))
        codes = (words[:, :, None] >> (6 + 3 * cols).to(tl.int64)[None, None, :]) & 7  # [TILES, rows, columns]
        w = _f16(scale[:, :, None] * _f16(codes.to(tl.float32) - zero[:, :, None]))
        w_t = tl.trans(tl.reshape(tl.permute(w, (1, 0, 2)), (16, BLOCK_K)))  # [BLOCK_K, 16 rows]
        j = g0 * 16 + tl.arange(0, BLOCK_K)
        inside = j < KP
        feature = _feature(perm_ptr, j, inside)
        valid = inside & (feature < K)
        xs = tl.load(x_ptr + offs_m[:, None] * stride_xm + feature[None, :],
                     mask=(offs_m < M)[:, None] & valid[None, :], other=0.0).to(tl.float32)  # fmt: skip
        acc += tl.dot(xs, w_t, input_precision="ieee")
    n = t * 16 + rows
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + n[None, :], acc, mask=(offs_m < M)[:, None] & (n < N)[None, :])


@triton.jit
def spqr_outlier_kernel(x_ptr, offsets_ptr, col_vals_ptr, perm_ptr, out_ptr, M, K, stride_xm, stride_om,
                        BLOCK_M: tl.constexpr):  # fmt: skip
    pid_m = tl.program_id(0)
    n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    start = tl.load(offsets_ptr + n)
    end = tl.load(offsets_ptr + n + 1)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for e in range(start, end):
        entry = tl.load(col_vals_ptr + e).to(tl.int64) & 0xFFFFFFFF
        value = _half_bits((entry >> 16) & 0xFFFF)
        feature = _feature(perm_ptr, entry & 0xFFFF, True)
        xs = tl.load(x_ptr + offs_m * stride_xm + feature, mask=(offs_m < M) & (feature < K), other=0.0)
        acc += value * xs.to(tl.float32)
    mask = offs_m < M
    current = tl.load(out_ptr + offs_m * stride_om + n, mask=mask, other=0.0)
    tl.store(out_ptr + offs_m * stride_om + n, current + acc, mask=mask)


def check_packed(packed, k: int, where: str) -> int:
    """``N`` after checking the four tensors (names, dtypes, shapes for ``K``), or a ``ValueError`` naming them."""
    if len(packed) != len(NAMES):
        raise ValueError(f"{where}: spqr-3 takes {len(NAMES)} packed tensors ({', '.join(NAMES)}), got {len(packed)}")
    n = packed[1].shape[0] - 1 if packed[1].dim() == 1 else -1
    if n < 0:
        raise ValueError(f"{where}: row_offsets is {packed[1].dtype}{list(packed[1].shape)}, expected int32[N + 1]")
    as_scheme("spqr-3").check_packed(list(packed), n, k, where=where)
    return n


def bind(scheme, x, packed, bias, n: int, *, block_m: int | None = None, tiles: int | None = None):
    """``launch(x, packed, bias) -> y`` for this call signature."""
    k = x.shape[-1]
    kp = as_scheme(scheme).padded_in_features(k)
    interp = common.interpreting()
    block_m = block_m or 16
    tiles = tiles or (2 if interp else 4)

    def launch(x, packed, bias):
        x2 = common.as_rows(x)
        m = x2.shape[0]
        out = torch.empty((m, n), device=x2.device, dtype=torch.float32)
        if m == 0 or n == 0:
            return common.as_input_shape(out.to(x.dtype), x)
        words, offsets, col_vals, in_perm = (t.contiguous() for t in packed)
        grid = (common.cdiv(m, block_m), common.cdiv(n, TILE))
        common.kernel(spqr_dense_kernel)[grid](
            x2, words, in_perm, words if bias is None else bias.contiguous(), out, m, n, k, kp, x2.stride(0),
            out.stride(0), HAS_BIAS=bias is not None, BLOCK_M=block_m, TILES=tiles,
        )  # fmt: skip
        if col_vals.numel():
            common.kernel(spqr_outlier_kernel)[(common.cdiv(m, block_m), n)](
                x2, offsets, col_vals, in_perm, out, m, k, x2.stride(0), out.stride(0), BLOCK_M=block_m,
            )  # fmt: skip
        return common.as_input_shape(out.to(x.dtype), x)

    return launch


def spqr_linear(x: torch.Tensor, packed, bias: torch.Tensor | None = None, **config) -> torch.Tensor:
    """``qcompile::linear`` for ``spqr-3``: ``x [..., K]`` → ``[..., N]`` in ``x.dtype`` (tensors checked by name)."""
    n = check_packed(packed, x.shape[-1], "triton spqr")
    return bind("spqr-3", x, packed, bias, n, **config)(x, packed, bias)


# -- dispatch row -----------------------------------------------------------------------------------------------------
def supports(scheme, x, packed) -> str | None:
    """``None`` when the Triton SpQR kernels serve the call, else why not."""
    return cuda_call_reason(x, packed, names=NAMES)


def kernel_entries(family: str) -> list[KernelEntry]:
    """The Triton SpQR row (CUDA only; none when triton cannot be imported)."""
    return cuda_rows(family, "spqr", "triton-spqr", supports, bind, PRIORITY)
