"""FP4 (E2M1) weights, ``mxfp4`` and ``nvfp4``: codes dequantized in the GEMM prologue, then ``tl.dot``.

Reads the canonical packed layouts (``qcompile.schemes.mxfp4``, ``qcompile.schemes.nvfp4``) directly::

    qweight uint8 [N, Kp / 2]    element 2j in the low nibble of byte j, 2j + 1 in the high nibble
                                 code: bit 3 sign, bits 0-2 index into {0, 0.5, 1, 1.5, 2, 3, 4, 6}
    mxfp4: scales uint8 [N, Kp / 32]                w[n, k] = e2m1(code) * 2^(scales[n, k // 32] - 127)
    nvfp4: scales float8_e4m3fn [N, Kp / 16],       w[n, k] = e2m1(code) * scales[n, k // 16] * global_scale
           global_scale float32 [1]

``Kp`` is ``K`` rounded up to whole groups, and to whole Hadamard blocks with a rotation (padding columns meet
zero activations). Hopper has no FP4 tensor cores: each ``[BLOCK_N, BLOCK_K]`` weight tile is read once, its
codes and group scales decoded from their bits (no lookup table, no int→float conversion: the bits are placed in
an fp16 and rescaled exactly), multiplied in fp32 (nvfp4: one multiply a weight) and cast to the activation's dtype
for ``tl.dot`` with fp32 accumulation. ``code * scale`` is exact in bf16 (2 + 4 significant bits; in fp16 within
its range); the nvfp4 tensor scale multiplies the fp32 sum in the epilogue.

Scheme options (``qcompile.schemes.fp4``): ``-had`` / ``-had<h>`` multiplies the zero-padded activation
``x_p [M, Kp]`` by the block-diagonal normalized Sylvester Hadamard ``Hb`` of block ``h`` first (torch, in fp32;
the stored weight is already in that basis). ``-w4a4`` quantizes the activation per token per group to the same
format at run time (:func:`fp4_quantize_kernel`, fp32 arithmetic where the reference divides in float64: a value
within an fp32 rounding of a code boundary may take the neighbouring code); the GEMM then takes
``code * block_scale`` (exact in the activation's dtype) and, for nvfp4, multiplies row ``m`` by the token's global
scale ``gx[m]`` in the epilogue.

Order of this file: formats, configs, the kernels, the launchers, the dispatch rows.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from qcompile.codegen.triton import autotune, common, traceable
from qcompile.codegen.triton.rows import cuda_call_reason, cuda_rows
from qcompile.codegen.triton.tiles import load_bias, split_k_range, store_tile, tile_indices, tile_start
from qcompile.codegen.triton.w8a8 import round_half_even, round_to_e4m3_grid
from qcompile.runtime.dispatch import KernelEntry
from qcompile.schemes import as_scheme
from qcompile.schemes.fp4 import hadamard as scheme_hadamard

FAMILIES = ("mxfp4", "nvfp4")
PRIORITY = 10
#: activation rows quantized per program of the w4a4 quantize kernel: groups per chunk
QUANTIZE_GROUPS = 32
#: programs a small-M launch aims for (an H100/H200 has 132 SMs), reached by splitting K
TARGET_PROGRAMS = 264


# -- formats ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Fp4Format:
    """What a launch needs to know of an FP4 scheme.

    ``family``: ``"mxfp4"`` (E8M0 scales, uint8) or ``"nvfp4"`` (E4M3 scales plus an fp32 tensor scale);
    ``group_size``: elements per scale along K (a power of two); ``rotation``: Hadamard block ``h`` or ``None``;
    ``activations``: quantize activations at run time (``-w4a4``).
    """

    family: str
    group_size: int
    rotation: int | None = None
    activations: bool = False

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"Fp4Format.family must be one of {FAMILIES}, got {self.family!r}")
        for what, value in (("group_size", self.group_size), ("rotation", self.rotation)):
            if value is not None and (value < 1 or value & (value - 1)):
                raise ValueError(f"Fp4Format.{what} must be a power of two, got {value}")

    @property
    def nv(self) -> bool:
        return self.family == "nvfp4"

    @property
    def n_tensors(self) -> int:
        return 3 if self.nv else 2

    def padded_in_features(self, in_features: int) -> int:
        """``K`` rounded up to whole groups and whole Hadamard blocks (both powers of two)."""
        unit = max(self.group_size, self.rotation or 1)
        return -(-in_features // unit) * unit


def fp4_format(scheme) -> Fp4Format:
    """The :class:`Fp4Format` of an ``mxfp4`` / ``nvfp4`` scheme (object or name), or ``scheme`` itself."""
    if isinstance(scheme, Fp4Format):
        return scheme
    scheme = as_scheme(scheme)
    if scheme.family not in FAMILIES:
        raise ValueError(f"fp4_linear: {scheme.name} is a {scheme.family} scheme, expected one of {FAMILIES}")
    return Fp4Format(scheme.family, scheme.group_size, scheme.rotation, scheme.activations)


def scheme_label(scheme) -> str:
    return scheme.name if hasattr(scheme, "name") else str(scheme)


# -- configs ------------------------------------------------------------------------------------------------------
def default_config(m: int, n: int, k: int, group_size: int) -> autotune.KernelConfig:
    """One config per path. Up to ``SPLITK_MAX_M`` rows (decode): 16 x 64 x 128 tiles, K split until about
    ``TARGET_PROGRAMS`` programs stream the weight. More rows: 64 or 128 x 128 x 64 tiles. The interpreter takes
    small tiles with K split in two, so both paths run on test shapes. ``BLOCK_K`` covers whole groups."""
    small = common.interpreting()
    if m <= common.SPLITK_MAX_M:
        block_n, block_k = (32, 32) if small else (64, 128)
        block_k = max(block_k, group_size)
        k_tiles = common.cdiv(k, block_k)
        split = min(k_tiles, 2) if small else max(1, min(k_tiles, TARGET_PROGRAMS // common.cdiv(n, block_n), 16))
        return autotune.KernelConfig(16, block_n, block_k, split_k=split, num_warps=4, num_stages=3)
    if small:
        return autotune.KernelConfig(16, 32, max(32, group_size), num_stages=1)
    block_m = 64 if m <= 64 else 128
    return autotune.KernelConfig(block_m, 128, max(64, group_size), num_warps=4 if block_m == 64 else 8,
                                 num_stages=3)  # fmt: skip


# -- kernels ------------------------------------------------------------------------------------------------------
@triton.jit
def e2m1_scaled(codes):
    """E2M1 ``codes`` (int32 in ``[0, 16)``) as fp32 ``value * 2**-14``, exact: the magnitude bits 0-2 go to fp16
    bits 9-11 (exponent low bits and the top mantissa bit; 0 and 0.5 become subnormals) and the sign bit 3 to bit
    15, so no lookup and no int→float conversion; the caller folds ``2**14`` into the group scale."""
    bits = ((codes & 7) << 9) | ((codes & 8) << 12)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def e4m3_scaled(byte):
    """float8 e4m3fn bits (int32 in ``[0, 256)``, NaN excluded) as fp32 ``value * 2**-8``, exact: exponent and
    mantissa go to fp16 bits 7-13 (subnormals stay subnormals), the sign bit 7 to bit 15."""
    bits = ((byte & 0x7F) << 7) | ((byte & 0x80) << 8)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def e8m0_value(byte):
    """``2 ** (byte - 127)`` as fp32 for int32 ``byte`` in ``[0, 255)``: the exponent field itself (byte 0 is
    ``2**-127``, fp32's subnormal ``0x00400000``)."""
    return tl.where(byte == 0, 0x00400000, byte << 23).to(tl.float32, bitcast=True)


@triton.jit
def weight_tile(qweight_ptr, scales_ptr, offs_n, mask_n, k0, KP, stride_qn, stride_sn,
                GROUP: tl.constexpr, NV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """The fp32 weight tile ``w[n, k0 : k0 + BLOCK_K]`` as ``[BLOCK_N, BLOCK_K]`` (``code * group scale``; zero
    beyond ``KP`` and ``N``). ``BLOCK_K`` is a multiple of ``GROUP`` and ``k0`` of ``BLOCK_K``."""
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    rows = offs_n.to(tl.int64)[:, None]
    mask_b = mask_n[:, None] & (offs_b[None, :] < KP // 2)
    packed = tl.load(qweight_ptr + rows * stride_qn + offs_b[None, :], mask=mask_b, other=0).to(tl.int32)
    codes = tl.reshape(tl.join(packed & 15, packed >> 4), (BLOCK_N, BLOCK_K))  # element 2j + t at [.., j, t]
    offs_g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
    mask_g = mask_n[:, None] & (offs_g[None, :] < KP // GROUP)
    scale_bits = tl.load(scales_ptr + rows * stride_sn + offs_g[None, :], mask=mask_g, other=0).to(tl.int32)
    codes = tl.reshape(e2m1_scaled(codes), (BLOCK_N, BLOCK_K // GROUP, GROUP))
    if NV:  # one multiply a weight: 2**-8 of the scale and 2**-14 of the code folded into the group's factor
        values = codes * (e4m3_scaled(scale_bits) * 4194304.0)[:, :, None]
    else:  # 2**14 apart: a factor 2**(s - 113) would overflow fp32 for s > 240
        values = (codes * 16384.0) * tl.where(mask_g, e8m0_value(scale_bits), 0.0)[:, :, None]
    return tl.reshape(values, (BLOCK_N, BLOCK_K))


@triton.jit
def fp4_linear_kernel(
    x_ptr, qweight_ptr, scales_ptr, global_ptr, row_scale_ptr, bias_ptr, out_ptr, work_ptr, count_ptr,
    M, N, K, KP, SPLIT_K, stride_xm, stride_qn, stride_sn, stride_om,
    NV: tl.constexpr, ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    GROUP: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``out[M, N] = (x[M, K] @ (code * group scale)[N, K].T) * row_scale[M] * global_scale + bias[N]``.

    ``x`` fp16/bf16/fp32 rows (``K <= KP``: columns from ``K`` on are zero); ``qweight`` uint8 ``[N, KP / 2]``;
    ``scales`` ``[N, KP / GROUP]`` uint8 bits (E8M0, or E4M3 with ``NV``); ``global_scale`` fp32 ``[1]`` (``NV``);
    ``row_scale`` fp32 ``[M]`` (``ROW_SCALE``); ``bias`` ``[N]``; ``out`` ``[M, N]`` float.
    Grid: ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K)``; blocks ``>= 16``, ``BLOCK_K`` a multiple of
    ``GROUP``. Split-K partial sums meet in the fp32 workspace (``tiles.store_tile``).
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
        w = weight_tile(qweight_ptr, scales_ptr, offs_n, mask_n, k_tile, KP, stride_qn, stride_sn, GROUP, NV,
                        BLOCK_N, BLOCK_K)  # fmt: skip
        acc = tl.dot(a.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=DOT_PRECISION)
    if NV:
        acc = acc * tl.load(global_ptr)
    if ROW_SCALE:
        acc = acc * tl.load(row_scale_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    y = acc + load_bias(bias_ptr, offs_n, N, HAS_BIAS, BLOCK_N)
    store_tile(out_ptr, y, offs_m, offs_n, M, N, stride_om, work_ptr, count_ptr, SPLIT_K, SPLIT)


@triton.jit
def e2m1_round(v):
    """``v`` (fp32, ``|v|`` any) rounded to the E2M1 grid, ties to even codes, saturating at ±6: spacing 0.5 below
    2, 1 below 4, 2 above (the spacing is a power of two, so ``v / spacing`` is exact)."""
    magnitude = tl.abs(v)
    step = tl.where(magnitude < 2.0, 0.5, tl.where(magnitude < 4.0, 1.0, 2.0))
    rounded = tl.minimum(round_half_even(magnitude / step) * step, 6.0)
    return tl.where(v < 0.0, -rounded, rounded)


@triton.jit
def floor_log2(v):
    """``floor(log2(v))`` of fp32 ``v > 0`` from its exponent bits, as int32 (subnormals give -127)."""
    return ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def fp4_quantize_kernel(
    x_ptr, q_ptr, row_scale_ptr, K, KP, stride_xm, stride_qm,
    NV: tl.constexpr, ROUND_FP8_IN_FP32: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr,
):  # fmt: skip
    """Per-token, per-group FP4 quantization of ``x [M, K]`` (zero-padded to ``KP``) into ``q [M, KP]``, which
    holds ``e2m1 code * block scale`` (exact in fp16/bf16/fp32), and ``row_scale`` fp32 ``[M]`` (``NV``).

    mxfp4: ``block scale = 2 ** (floor(log2(amax(block))) - 2)`` (E8M0, the exponent clamped to ``[-127, 127]``).
    nvfp4: ``gx = amax(row) / (448 * 6)`` (1 for a zero row; ``row_scale``), ``block scale = e4m3(min(amax(block)
    / 6 / gx, 448))``; the dequantized value is ``q * gx``. Codes: ``x / scale`` (``x / (block scale * gx)``)
    rounded to E2M1, ties to even, saturating at 6; zero where the scale is 0. fp32 operations in the order of
    ``qcompile.schemes.nvfp4`` / ``mxfp4``. Grid: ``(M,)``.
    """
    row = tl.program_id(0)
    offs = tl.arange(0, GROUPS)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    q_row = q_ptr + row.to(tl.int64) * stride_qm
    if NV:
        row_max = tl.zeros((GROUPS, GROUP), dtype=tl.float32)
        for k0 in range(0, K, GROUPS * GROUP):
            x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            row_max = tl.maximum(row_max, tl.abs(x))
        global_scale = tl.math.div_rn(tl.max(tl.max(row_max, axis=1), axis=0), 448.0 * 6.0)
        global_scale = tl.where(global_scale > 0.0, global_scale, 1.0)
        tl.store(row_scale_ptr + row, global_scale)
    for k0 in range(0, KP, GROUPS * GROUP):
        x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
        if NV:
            block = tl.math.div_rn(tl.math.div_rn(amax, 6.0), global_scale)
            block = tl.minimum(block, 448.0)
            if ROUND_FP8_IN_FP32:
                block = round_to_e4m3_grid(block)
            else:
                block = block.to(tl.float8e4nv).to(tl.float32)
            divisor = block * global_scale
            v = tl.math.div_rn(x, tl.where(divisor > 0.0, divisor, 1.0)[:, None])
            q = tl.where(divisor[:, None] > 0.0, e2m1_round(v), 0.0) * block[:, None]
        else:
            exponent = tl.minimum(tl.maximum(floor_log2(amax) - 2, -127), 127)
            scale, inverse = e8m0_value(exponent + 127), e8m0_value(127 - exponent)  # 2**exponent, 2**-exponent
            q = e2m1_round(x * inverse[:, None]) * scale[:, None]
        tl.store(q_row + k0 + offs, q.to(q_ptr.dtype.element_ty), mask=k0 + offs < KP)


# -- launchers ----------------------------------------------------------------------------------------------------
@functools.cache
def hadamard(h: int, device: torch.device) -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix of size ``h`` (``qcompile.schemes.fp4.hadamard``), fp32 ``[h, h]``,
    made once per device."""
    return scheme_hadamard(h, torch.float32, device)


def rotate(x2: torch.Tensor, kp: int, h: int) -> torch.Tensor:
    """``x_p @ Hb`` in fp32: ``x2 [M, K]`` zero-padded to ``[M, kp]`` times the block-diagonal Hadamard of block
    ``h`` (``kp`` a multiple of ``h``). While launches are traced, butterflies (:func:`walsh_hadamard`) stand in for
    the cached matrix, so the graph holds no tensor made outside it."""
    m, k = x2.shape
    x_p = torch.nn.functional.pad(x2.float(), (0, kp - k))
    if common.tracing():
        return walsh_hadamard(x_p, h)
    return (x_p.reshape(m, kp // h, h) @ hadamard(h, x2.device)).reshape(m, kp)


def walsh_hadamard(x: torch.Tensor, h: int) -> torch.Tensor:
    """``x [M, Kp] @ Hb`` without a matrix: ``log2(h)`` butterfly stages ``(a, b) -> (a + b, a - b)`` on elements
    ``span`` apart (span 1, 2, 4, ...: Sylvester's order), then the ``1 / sqrt(h)`` normalization."""
    m, kp = x.shape
    y, span = x, 1
    while span < h:
        pairs = y.reshape(m, kp // (2 * span), 2, span)
        y = torch.stack([pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]], dim=2).reshape(m, kp)
        span *= 2
    return y * h**-0.5


def quantize_activations(x2: torch.Tensor, kp: int, fmt: Fp4Format, dtype: torch.dtype):
    """``(q [M, kp] in dtype, row_scale fp32 [M] or None)`` from :func:`fp4_quantize_kernel`."""
    m, k = x2.shape
    q = torch.empty((m, kp), device=x2.device, dtype=dtype)
    row_scale = torch.empty((m,), device=x2.device, dtype=torch.float32) if fmt.nv else None
    groups = min(QUANTIZE_GROUPS, common.next_power_of_2(common.cdiv(kp, fmt.group_size)))
    if m:
        common.kernel(fp4_quantize_kernel)[(m,)](
            x2, q, q if row_scale is None else row_scale, k, kp, x2.stride(0), q.stride(0),
            NV=fmt.nv, ROUND_FP8_IN_FP32=common.interpreting() or common.device_capability(x2.device) < (8, 9),
            GROUP=fmt.group_size, GROUPS=groups,
        )  # fmt: skip
    return q, row_scale


def check_packed(fmt: Fp4Format, packed, n: int, k: int, kp: int, where: str) -> None:
    """Check the packed tensors' count, dtypes and shapes against the layout for ``K = k`` padded to ``kp``
    (``ValueError`` naming the tensor, what was expected and what came)."""
    names = ("qweight", "scales", "global_scale")[: fmt.n_tensors]
    if len(packed) != fmt.n_tensors:
        raise ValueError(f"{where}: {fmt.family} takes {fmt.n_tensors} packed tensors ({', '.join(names)}), "
                         f"got {len(packed)}")  # fmt: skip
    if kp % fmt.group_size or kp < k:
        raise ValueError(f"{where}: Kp={kp} for K={k} is not a whole number of groups of {fmt.group_size}")
    scale_dtype = torch.float8_e4m3fn if fmt.nv else torch.uint8
    expected = [(torch.uint8, (n, kp // 2)), (scale_dtype, (n, kp // fmt.group_size)), (torch.float32, (1,))]
    for name, tensor, (dtype, shape) in zip(names, packed, expected):
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            got = f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}"
            raise ValueError(f"{where}: {name} is {got}, expected {str(dtype).removeprefix('torch.')}{list(shape)} "
                             f"for [N={n}, K={k}]")  # fmt: skip
    if fmt.rotation is not None and kp % fmt.rotation:
        raise ValueError(f"{where}: Kp={kp} is not a multiple of the Hadamard block {fmt.rotation}")


def bind(scheme, x, packed, bias, out_features, *, config: autotune.KernelConfig | None = None):
    """``launch(x, packed, bias) -> y`` for calls with this one's signature (shapes, dtypes, scheme): the
    packed tensors are checked and the config and kernel arguments worked out once."""
    if isinstance(scheme, str):
        scheme = as_scheme(scheme)
    fmt = fp4_format(scheme)
    where = f"fp4_linear({scheme_label(scheme)})"
    common.check_activation(x, where)
    n, k = out_features, x.shape[-1]
    kp = scheme.padded_in_features(k)  # a scheme's or an Fp4Format's rule
    check_packed(fmt, packed, n, k, kp, where)
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"{where}: bias is {list(bias.shape)}, expected [{n}]")
    m = x.numel() // k
    k_run = kp if fmt.rotation is not None or fmt.activations else k
    cfg = config or default_config(m, n, k_run, fmt.group_size)
    if cfg.block_k % fmt.group_size or min(cfg.block_m, cfg.block_n, cfg.block_k) < 16:
        raise ValueError(f"{where}: config {cfg.label} needs blocks >= 16 and BLOCK_K a multiple of the group "
                         f"{fmt.group_size}")  # fmt: skip
    dtype = x.dtype
    grid = (common.cdiv(m, cfg.block_m) * common.cdiv(n, cfg.block_n), cfg.split_k)
    meta = dict(
        NV=fmt.nv, ROW_SCALE=fmt.nv and fmt.activations, HAS_BIAS=bias is not None, SPLIT=cfg.split_k > 1,
        GROUP=fmt.group_size, DOT_DTYPE=common.dot_dtype(dtype), DOT_PRECISION=common.dot_precision(dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    name = f"the FP4 kernel ({cfg.label})"

    def gemm(a, row_scale, qweight, scales, global_scale, bias):
        out = torch.empty((m, n), device=a.device, dtype=dtype)
        if m == 0:
            return out
        work, counts = (common.split_workspace(a.device, m * n, grid[0]) if cfg.split_k > 1
                        else common.no_workspace(out))  # fmt: skip
        scale_bits = scales.view(torch.uint8)
        try:
            common.kernel(fp4_linear_kernel)[grid](
                a, qweight, scale_bits, scale_bits if global_scale is None else global_scale,
                scale_bits if row_scale is None else row_scale, scale_bits if bias is None else bias, out, work,
                counts, m, n, a.shape[1], kp, cfg.split_k, a.stride(0), qweight.stride(0), scale_bits.stride(0),
                out.stride(0), **meta,
            )  # fmt: skip
        except Exception as error:
            if not common.fewer_stages(error, meta, name):
                raise
            return gemm(a, row_scale, qweight, scales, global_scale, bias)
        return out

    def launch(x, packed, bias):
        x2 = common.as_rows(x)
        if fmt.rotation is not None:
            x2 = rotate(x2, kp, fmt.rotation)
        row_scale = None
        if fmt.activations:
            x2, row_scale = quantize_activations(x2, kp, fmt, dtype)
        elif x2.dtype != dtype:
            x2 = x2.to(dtype)
        global_scale = packed[2] if fmt.nv else None
        out = gemm(x2, row_scale, packed[0].contiguous(), packed[1].contiguous(), global_scale, bias)
        return common.as_input_shape(out, x)

    return launch


def fp4_linear(x: torch.Tensor, packed, bias: torch.Tensor | None, scheme, *,
               config: autotune.KernelConfig | None = None) -> torch.Tensor:  # fmt: skip
    """``qcompile::linear`` for ``mxfp4`` and ``nvfp4`` schemes: ``x [..., K]`` → ``[..., N]`` in ``x.dtype``.

    ``packed``: the scheme's tensor list (see the module docstring); ``scheme``: a scheme, its name, or an
    :class:`Fp4Format`; ``config``: a launch config in place of :func:`default_config`."""
    n = packed[0].shape[0] if len(packed) else 0
    return bind(scheme, x, packed, bias, n, config=config)(x, packed, bias)


# -- dispatch rows ------------------------------------------------------------------------------------------------
def supports(scheme, x, packed) -> str | None:
    """``None`` when the Triton FP4 kernel serves the call, else why not."""
    missing = common.triton_missing()
    if missing is not None:
        return missing
    if scheme.family not in FAMILIES:
        return f"{scheme.name} is not an FP4 scheme"
    return cuda_call_reason(x, packed)


def kernel_entries(family: str) -> list[KernelEntry]:
    """The Triton FP4 row for ``family`` (CUDA only; none when triton cannot be imported)."""
    return cuda_rows(family, FAMILIES, "triton-fp4", supports, bind, PRIORITY, inline=traceable.inline)
