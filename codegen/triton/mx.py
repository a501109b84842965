"""OCP MX 6- and 8-bit weights, ``mxfp6`` and ``mxfp8``: codes dequantized in the GEMM prologue, then ``tl.dot``.

Reads the canonical packed layouts (``qcompile.schemes.mx``, ``mxfp6``, ``mxfp8``) directly::

    mxfp6: qweight uint8 [N, Kp * 3 / 4]     element k in bits 6k % 8 .. of bytes 6k / 8 (and the next one): 4 codes
                                             in 3 bytes, element 4j + i in bits 6i .. 6i + 5 of bytes 3j .. 3j + 2 (LE)
    mxfp8: qweight float8 [N, Kp]            one code a byte (read as uint8)
    scales uint8 [N, Kp / 32]                w[n, k] = element(code) * 2^(scales[n, k // 32] - 127)

A code is ``sign | E | M`` (E2M3, E3M2, E4M3 or E5M2; ``qcompile.schemes.mx.ELEMENTS``). Each ``[BLOCK_N, BLOCK_K]``
weight tile is read once and its codes decoded from their bits: the magnitude bits go to fp16 bits ``10 - M ..`` and
the sign to bit 15, which is the element's value times ``2**(bias - 15)`` exactly (subnormals stay subnormals; an
E5M2 code is the top byte of an fp16, Inf and NaN included; E4M3's ``S.1111.111`` is made NaN); times
``2**(15 - bias)`` and the group scale in fp32 (exact), cast to the dot dtype, ``tl.dot`` with fp32 accumulation.
fp6 rows are read two bytes an element (gathered loads that the tile's cache lines serve).

Dot dtype: weight-only, the activation's (fp16 weights lose what falls outside fp16's range); with activations
quantized (``-w6a6`` / ``-w8a8``) the activation is quantized per token per group of 32 at run time by
:func:`mx_quantize_kernel` to ``element * 2**e`` values, stored in bf16 for fp16 / bf16 activations (at most 4
significant bits: exact, and bf16 has fp32's range) and in fp32 for fp32 ones; the weight tile takes the same dtype.
Under the interpreter every dot is fp32 (its bf16 dots are wrong).

Order of this file: configs, the kernels, the launchers, the dispatch rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.codegen.triton import autotune, common, traceable
from qcompile.codegen.triton.fp4 import e8m0_value, floor_log2
from qcompile.codegen.triton.rows import cuda_call_reason, cuda_rows
from qcompile.codegen.triton.tiles import load_bias, split_k_range, store_tile, tile_indices, tile_start
from qcompile.codegen.triton.w8a8 import round_half_even
from qcompile.runtime.dispatch import KernelEntry
from qcompile.schemes import as_scheme

FAMILIES = ("mxfp6", "mxfp8")
PRIORITY = 10
GROUP = 32
#: groups of 32 a program of the activation quantizer handles per step
QUANTIZE_GROUPS = 32
#: programs a small-M launch aims for (an H100/H200 has 132 SMs), reached by splitting K
TARGET_PROGRAMS = 264
SPECIALS = {"none": 0, "fn": 1, "ieee": 2}


# -- configs ------------------------------------------------------------------------------------------------------
def default_config(m: int, n: int, k: int) -> autotune.KernelConfig:
    """Up to ``SPLITK_MAX_M`` rows (decode): 16 x 64 x 128 tiles, K split until about ``TARGET_PROGRAMS`` programs
    stream the weight. More rows: 64 or 128 x 128 x 64 tiles. The interpreter takes small tiles with K split in two,
    so both paths run on test shapes. ``BLOCK_K`` covers whole groups of 32."""
    small = common.interpreting()
    if m <= common.SPLITK_MAX_M:
        block_n, block_k = (32, 32) if small else (64, 128)
        k_tiles = common.cdiv(k, block_k)
        split = min(k_tiles, 2) if small else max(1, min(k_tiles, TARGET_PROGRAMS // common.cdiv(n, block_n), 16))
        return autotune.KernelConfig(16, block_n, block_k, split_k=split, num_warps=4, num_stages=3)
    if small:
        return autotune.KernelConfig(16, 32, 32, num_stages=1)
    block_m = 64 if m <= 64 else 128
    return autotune.KernelConfig(block_m, 128, 64, num_warps=4 if block_m == 64 else 8, num_stages=3)


# -- kernels ------------------------------------------------------------------------------------------------------
@triton.jit
def element_value(codes, BITS: tl.constexpr, MBITS: tl.constexpr, SPECIAL: tl.constexpr):
    """MX element ``codes`` (int32 in ``[0, 2**BITS)``) as fp32 ``value * 2**(bias - 15)``, exact (module
    docstring): the magnitude bits placed in an fp16 under its sign."""
    magnitude = codes & ((1 << (BITS - 1)) - 1)
    bits = (magnitude << (10 - MBITS)) | ((codes >> (BITS - 1)) << 15)
    value = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    if SPECIAL == 1:  # S.1111.111 is NaN
        value = tl.where(magnitude == (1 << (BITS - 1)) - 1, 0x7FC00000, value.to(tl.int32, bitcast=True))
        value = value.to(tl.float32, bitcast=True)
    return value


@triton.jit
def element_round(v, MBITS: tl.constexpr, BIAS: tl.constexpr, MAX: tl.constexpr):
    """fp32 ``v`` rounded to the element grid (``MBITS`` mantissa bits, exponent bias ``BIAS``, largest value
    ``MAX``): nearest, ties to even, saturating; the spacing ``2**(max(floor(log2|v|), 1 - BIAS) - MBITS)`` is a power
    of two, so ``|v| / spacing`` is exact."""
    magnitude = tl.abs(v)
    exponent = tl.maximum(floor_log2(magnitude), 1 - BIAS)
    spacing = ((exponent - MBITS + 127) << 23).to(tl.float32, bitcast=True)
    rounded = tl.minimum(round_half_even(magnitude / spacing) * spacing, MAX)
    return tl.where(v < 0.0, -rounded, rounded)


@triton.jit
def weight_tile(qweight_ptr, scales_ptr, offs_n, mask_n, k0, KP, stride_qn, stride_sn,
                BITS: tl.constexpr, MBITS: tl.constexpr, SPECIAL: tl.constexpr, FACTOR: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """The fp32 weight tile ``w[n, k0 : k0 + BLOCK_K]`` as ``[BLOCK_N, BLOCK_K]`` (``element * 2**(s - 127)``; zero
    beyond ``KP`` and ``N``). ``FACTOR`` is ``2**(15 - bias)``; ``BLOCK_K`` a multiple of 32, ``k0`` of ``BLOCK_K``."""
    rows = offs_n.to(tl.int64)[:, None] * stride_qn
    ks = k0 + tl.arange(0, BLOCK_K)
    mask = mask_n[:, None] & (ks[None, :] < KP)
    if BITS == 8:
        codes = tl.load(qweight_ptr + rows + ks[None, :], mask=mask, other=0).to(tl.int32)
    else:  # element k: bits 6k % 8 .. of byte 6k / 8, spilling into the next byte when that shift is above 2
        byte = (ks * 6) >> 3
        shift = ((ks * 6) & 7)[None, :]
        low = tl.load(qweight_ptr + rows + byte[None, :], mask=mask, other=0).to(tl.int32)
        high = tl.load(qweight_ptr + rows + byte[None, :] + 1, mask=mask & (shift > 2), other=0).to(tl.int32)
        codes = ((low | (high << 8)) >> shift) & 63
    offs_g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    mask_g = mask_n[:, None] & (offs_g[None, :] < KP // 32)
    scale_bits = tl.load(scales_ptr + offs_n.to(tl.int64)[:, None] * stride_sn + offs_g[None, :], mask=mask_g,
                         other=0).to(tl.int32)  # fmt: skip
    values = tl.reshape(element_value(codes, BITS, MBITS, SPECIAL) * FACTOR, (BLOCK_N, BLOCK_K // 32, 32))
    values = values * tl.where(mask_g, e8m0_value(scale_bits), 0.0)[:, :, None]
    return tl.reshape(values, (BLOCK_N, BLOCK_K))


@triton.jit
def mx_linear_kernel(
    x_ptr, qweight_ptr, scales_ptr, bias_ptr, out_ptr, work_ptr, count_ptr,
    M, N, K, KP, SPLIT_K, stride_xm, stride_qn, stride_sn, stride_om,
    BITS: tl.constexpr, MBITS: tl.constexpr, SPECIAL: tl.constexpr, FACTOR: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``out[M, N] = x[M, K] @ (element * 2**(s - 127))[N, K].T + bias[N]``.

    ``x`` fp16/bf16/fp32 rows (``K <= KP``: columns from ``K`` on are zero); ``qweight`` uint8 ``[N, KP * BITS / 8]``;
    ``scales`` uint8 ``[N, KP / 32]``; ``bias`` ``[N]``; ``out`` ``[M, N]`` float. Grid: ``(cdiv(M, BLOCK_M) *
    cdiv(N, BLOCK_N), SPLIT_K)``; blocks ``>= 16``, ``BLOCK_K`` a multiple of 32. Split-K partial sums meet in the
    fp32 workspace (``tiles.store_tile``).
    """
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
        ks = k_tile + offs_k
        a = tl.load(x_rows + ks[None, :], mask=mask_m[:, None] & (ks[None, :] < K), other=0.0)
        w = weight_tile(qweight_ptr, scales_ptr, offs_n, mask_n, k_tile, KP, stride_qn, stride_sn, BITS, MBITS,
                        SPECIAL, FACTOR, BLOCK_N, BLOCK_K)  # fmt: skip
        acc = tl.dot(a.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=DOT_PRECISION)
    y = acc + load_bias(bias_ptr, offs_n, N, HAS_BIAS, BLOCK_N)
    store_tile(out_ptr, y, offs_m, offs_n, M, N, stride_om, work_ptr, count_ptr, SPLIT_K, SPLIT)


@triton.jit
def mx_quantize_kernel(
    x_ptr, q_ptr, K, KP, stride_xm, stride_qm,
    MBITS: tl.constexpr, BIAS: tl.constexpr, EMAX: tl.constexpr, MAX: tl.constexpr, GROUPS: tl.constexpr,
):  # fmt: skip
    """Per-token, per-32 MX quantization of ``x [M, K]`` (zero-padded to ``KP``) into ``q [M, KP]``, which holds
    ``element * 2**e``: ``e = clamp(floor(log2(amax)) - EMAX, -127, 127)`` (E8M0; -127 for a zero group), element
    the nearest value of ``x * 2**-e`` (:func:`element_round`). fp32 operations as ``qcompile.schemes.mx``. Grid:
    ``(M,)``."""
    row = tl.program_id(0)
    offs = tl.arange(0, GROUPS)[:, None] * 32 + tl.arange(0, 32)[None, :]
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    q_row = q_ptr + row.to(tl.int64) * stride_qm
    for k0 in range(0, KP, GROUPS * 32):
        x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
        exponent = tl.minimum(tl.maximum(floor_log2(amax) - EMAX, -127), 127)
        scale, inverse = e8m0_value(exponent + 127), e8m0_value(127 - exponent)  # 2**e, 2**-e
        q = element_round(x * inverse[:, None], MBITS, BIAS, MAX) * scale[:, None]
        tl.store(q_row + k0 + offs, q.to(q_ptr.dtype.element_ty), mask=k0 + offs < KP)


# -- launchers ----------------------------------------------------------------------------------------------------
def mx_scheme(scheme):
    """The ``mxfp6`` / ``mxfp8`` scheme of ``scheme`` (an object or a name)."""
    scheme = as_scheme(scheme)
    if scheme.family not in FAMILIES:
        raise ValueError(f"mx_linear: {scheme.name} is a {scheme.family} scheme, expected one of {FAMILIES}")
    return scheme


def quantized_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """The dtype quantized activations are stored and multiplied in (module docstring)."""
    if x_dtype == torch.float32 or common.interpreting():
        return torch.float32
    return torch.bfloat16


def quantize_activations(x2: torch.Tensor, kp: int, scheme, dtype: torch.dtype) -> torch.Tensor:
    """``q [M, kp]`` in ``dtype`` from :func:`mx_quantize_kernel`."""
    m, k = x2.shape
    fmt = scheme.fmt
    q = torch.empty((m, kp), device=x2.device, dtype=dtype)
    groups = min(QUANTIZE_GROUPS, common.next_power_of_2(kp // GROUP))
    if m:
        common.kernel(mx_quantize_kernel)[(m,)](
            x2, q, k, kp, x2.stride(0), q.stride(0),
            MBITS=fmt.mbits, BIAS=fmt.bias, EMAX=fmt.emax, MAX=fmt.max_value, GROUPS=groups,
        )  # fmt: skip
    return q


def bind(scheme, x, packed, bias, out_features, *, config: autotune.KernelConfig | None = None):
    """``launch(x, packed, bias) -> y`` for calls with this one's signature (shapes, dtypes, scheme): the packed
    tensors are checked against the scheme's declaration and the config and kernel arguments worked out once."""
    scheme = mx_scheme(scheme)
    where = f"mx_linear({scheme.name})"
    common.check_activation(x, where)
    n, k = out_features, x.shape[-1]
    kp = scheme.padded_in_features(k)
    scheme.check_packed(list(packed), n, k, where)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{where}: bias is {list(bias.shape)}, expected [{n}]")
    m = x.numel() // k
    cfg = config or default_config(m, n, kp if scheme.activations else k)
    if cfg.block_k % GROUP or min(cfg.block_m, cfg.block_n, cfg.block_k) < 16:
        raise ValueError(f"{where}: config {cfg.label} needs blocks >= 16 and BLOCK_K a multiple of {GROUP}")
    dtype = x.dtype
    operand = quantized_dtype(dtype) if scheme.activations else dtype
    fmt = scheme.fmt
    grid = (common.cdiv(m, cfg.block_m) * common.cdiv(n, cfg.block_n), cfg.split_k)
    meta = dict(
        BITS=fmt.bits, MBITS=fmt.mbits, SPECIAL=SPECIALS[fmt.specials], FACTOR=float(2 ** (15 - fmt.bias)),
        HAS_BIAS=bias is not None, SPLIT=cfg.split_k > 1, DOT_DTYPE=common.dot_dtype(operand),
        DOT_PRECISION=common.dot_precision(operand), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    name = f"the MX kernel ({cfg.label})"

    def gemm(a, qweight, scales, bias):
        out = torch.empty((m, n), device=a.device, dtype=dtype)
        if m == 0:
            return out
        work, counts = (common.split_workspace(a.device, m * n, grid[0]) if cfg.split_k > 1
                        else common.no_workspace(out))  # fmt: skip
        try:
            common.kernel(mx_linear_kernel)[grid](
                a, qweight, scales, scales if bias is None else bias, out, work, counts, m, n, a.shape[1], kp,
                cfg.split_k, a.stride(0), qweight.stride(0), scales.stride(0), out.stride(0), **meta,
            )  # fmt: skip
        except Exception as error:
            if not common.fewer_stages(error, meta, name):
                raise
            return gemm(a, qweight, scales, bias)
        return out

    def launch(x, packed, bias):
        x2 = common.as_rows(x)
        if scheme.activations:
            x2 = quantize_activations(x2, kp, scheme, operand)
        qweight = packed[0].contiguous().view(torch.uint8)
        out = gemm(x2, qweight, packed[1].contiguous(), bias)
        return common.as_input_shape(out, x)

    return launch


def mx_linear(x: torch.Tensor, packed, bias: torch.Tensor | None, scheme, *,
              config: autotune.KernelConfig | None = None) -> torch.Tensor:  # fmt: skip
    """``qcompile::linear`` for ``mxfp6`` and ``mxfp8`` schemes: ``x [..., K]`` → ``[..., N]`` in ``x.dtype``.

    ``packed``: the scheme's tensor list (module docstring); ``scheme``: a scheme or its name; ``config``: a launch
    config in place of :func:`default_config`."""
    n = packed[0].shape[0] if len(packed) else 0
    return bind(scheme, x, packed, bias, n, config=config)(x, packed, bias)


# -- dispatch rows ------------------------------------------------------------------------------------------------
def supports(scheme, x, packed) -> str | None:
    """``None`` when the Triton MX kernel serves the call, else why not."""
    missing = common.triton_missing()
    if missing is not None:
        return missing
    if scheme.family not in FAMILIES:
        return f"{scheme.name} is not an MX 6- or 8-bit scheme"
    return cuda_call_reason(x, packed, needs="needs compute capability {}+ (bf16 dots)")


def kernel_entries(family: str) -> list[KernelEntry]:
    """The Triton MX row for ``family`` (CUDA only; none when triton cannot be imported)."""
    return cuda_rows(family, FAMILIES, "triton-mx", supports, bind, PRIORITY, inline=traceable.inline)
