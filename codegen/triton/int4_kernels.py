"""W4A16 ``@triton.jit`` kernels: ``int4-gN`` weights dequantized in registers, in the loop that reads them.

The launcher, its configs and the layout notes are in ``int4.py``. Order: code helpers, the dot kernel (split-K and
GEMM paths), the GEMV helpers and kernel (one to four rows), the dequantize kernel (the weight for a cuBLAS GEMM at
large M). ``python -m qcompile.codegen.triton.asm`` shows what each compiles to.
"""

from __future__ import annotations

import triton
import triton.language as tl

from qcompile.codegen.triton.tiles import (
    bits_as_float,
    in_k,
    load_bias,
    split_k_range,
    store_tile,
    tile_indices,
    tile_start,
)


@triton.jit
def plane(words, i: tl.constexpr):
    """Nibble ``i`` of int32 ``words`` (element ``8 * word + i``) as exact fp32; ``& 0xF`` undoes the sign
    extension of ``>>`` on the top nibble."""
    return bits_as_float((words >> (4 * i)) & 0xF, 0.0)


@triton.jit
def code_pairs(words, i: tl.constexpr, CODE_DTYPE: tl.constexpr, CODE_BITS: tl.constexpr):
    """Nibbles ``i`` and ``i + 4`` of int32 ``words [R, W]`` as 16-bit floats ``base + c``, ``[R, 2 W]``.

    ``(word >> 4i) & 0x000F000F`` leaves one nibble in each 16-bit half; OR-ed with the bits of ``base``
    (``CODE_BITS``: 128.0 in bf16, 1024.0 in fp16, where the spacing of floats is 1) each half is the 16-bit float
    ``base + c``, exactly: two codes for a shift and two logic operations, no conversion."""
    bits = ((words >> (4 * i)) & 0x000F000F) | (CODE_BITS * 0x10001)
    pair = tl.join(bits.to(tl.int16), (bits >> 16).to(tl.int16)).to(CODE_DTYPE, bitcast=True)
    return tl.reshape(pair, (words.shape[0], 2 * words.shape[1]))


@triton.jit
def word_codes(words, CODE_DTYPE: tl.constexpr, CODE_BITS: tl.constexpr, OFFSET_BITS: tl.constexpr):
    """The codes of int32 ``words [R, W]`` minus an offset as exact 16-bit floats ``[R, 8 W]``, in column order.

    Word ``j`` holds columns ``8j .. 8j+7``; :func:`code_pairs` gives columns ``(8j+i, 8j+i+4)`` and the joins
    put column ``8j + 4h + 2a + b`` at ``[.., 2j + h, a, b]``, i.e. back in order. ``OFFSET_BITS`` is the 16-bit
    float ``base + offset`` subtracted (``offset`` 8 for symmetric codes, else 0; exact, packed pairs)."""
    p0 = code_pairs(words, 0, CODE_DTYPE, CODE_BITS)
    p1 = code_pairs(words, 1, CODE_DTYPE, CODE_BITS)
    p2 = code_pairs(words, 2, CODE_DTYPE, CODE_BITS)
    p3 = code_pairs(words, 3, CODE_DTYPE, CODE_BITS)
    codes = tl.reshape(tl.join(tl.join(p0, p2), tl.join(p1, p3)), (words.shape[0], 8 * words.shape[1]))
    return codes - tl.full(codes.shape, OFFSET_BITS, tl.int16).to(CODE_DTYPE, bitcast=True)


@triton.jit
def group_meta(scales_ptr, zeros_ptr, offs_n, mask_n, ks, k_mask, stride_sn, k0,
               GROUP_SIZE: tl.constexpr, SYMMETRIC: tl.constexpr, GROUP_ALIGNED: tl.constexpr):  # fmt: skip
    """``(scale, zero * scale)`` of the tile's columns ``ks``: ``[1, BLOCK_N]`` when the tile lies in one group,
    else gathered per element ``[len(ks), BLOCK_N]``. Weights are then ``code * scale - zero * scale``."""
    if GROUP_ALIGNED:
        meta = (offs_n * stride_sn + k0 // GROUP_SIZE)[None, :]
        mask = mask_n[None, :]
    else:
        meta = offs_n[None, :] * stride_sn + (ks // GROUP_SIZE)[:, None]
        mask = k_mask[:, None] & mask_n[None, :]
    scale = tl.load(scales_ptr + meta, mask=mask, other=0.0)
    if SYMMETRIC:
        shift = 8.0 * scale
    else:
        shift = tl.load(zeros_ptr + meta, mask=mask, other=0.0) * scale
    return scale, shift


@triton.jit
def int4_linear_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, work_ptr, count_ptr, sums_ptr,
    M, N, K, SPLIT_K, stride_xm, stride_qn, stride_sn, stride_om,
    GROUP_SIZE: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_ALIGNED: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
    WORDS: tl.constexpr, CODE_DTYPE: tl.constexpr, CODE_BITS: tl.constexpr, TILE_SUMS: tl.constexpr,
    PLANES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``out[M, N] = x[M, K] @ dequant(qweight).T + bias`` with ``tl.dot`` (split-K and GEMM paths).

    Shapes and dtypes: ``x`` fp16/bf16/fp32 ``[M, K]`` (unit stride along K); ``qweight`` uint8 ``[N, K_padded/2]``;
    ``scales``/``zeros`` fp32 ``[N, K_padded/GROUP_SIZE]`` (``zeros`` unused when ``SYMMETRIC``); ``bias`` ``[N]``;
    ``out`` ``[M, N]`` in x's dtype; with ``SPLIT`` the splits meet in the fp32 workspace ``work [M, N]`` and the
    int32 tile counters ``count`` (zeros before and after, see ``tiles.store_tile``).
    Grid: ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K)``.
    Constraints: ``BLOCK_M, BLOCK_N >= 16`` and ``BLOCK_K >= 32``; ``GROUP_ALIGNED`` requires
    ``GROUP_SIZE % BLOCK_K == 0`` (one scale per column per tile), otherwise scales are gathered per element.

    The product is computed transposed, ``out.T = dequant(W) @ x.T``: the dequantized weight tile is the dot's
    first operand, which the tensor cores take straight from registers (on Hopper, ``wgmma`` with A in registers),
    so it is never written to shared memory; the activations, a small tile, are the second. The packed tile
    ``[BLOCK_N, BLOCK_K / 2]`` lies along the weight rows (16-byte loads); its low and high nibbles are joined
    back into ``[BLOCK_N, BLOCK_K]`` in registers and dequantized, ``code * scale - zero * scale`` in fp32.

    ``WORDS`` (needs ``GROUP_ALIGNED``, 4-byte aligned rows, 16-bit ``CODE_DTYPE``): the tile is read as int32 words
    and the dot takes the **codes** themselves, ``c - 8`` (symmetric) or ``c``, exact 16-bit floats made with a
    shift and two logic operations per pair (:func:`word_codes`, ``CODE_BITS`` the bits of the base 128.0 / 1024.0);
    the group's scale (one per row: the tile lies in one group) is applied to the tile's fp32 dot product,
    ``acc += (codes @ x.T - zero * sum(x)) * scale``. Products and sums are then exact fp32 where the dequantized
    form rounds every weight to the activation dtype. The activation sums of asymmetric tiles come from ``sums``
    ``[cdiv(K, BLOCK_K), M]`` fp32 (:func:`tile_sums_kernel`) when ``TILE_SUMS``: summed in the tile, they cost more
    than the dequantization saved past 16 rows; the zero terms are then subtracted after the loop, in a few dots over
    the K tiles (:func:`minus_zero_terms`), not with an FMA per output element in every tile. ``PLANES`` (with
    ``WORDS``, ``BLOCK_K >= 64``): one dot per plane of nibble pairs (:func:`code_pairs`, columns ``8j + i`` and
    ``8j + i + 4``) against the activation columns gathered to match, instead of one dot over the codes put back in
    column order: the codes go to the tensor cores without a trip through shared memory, the activations come
    through 2-byte loads. The one-to-four-row GEMV is :func:`int4_gemv_kernel`.
    """
    pid_m, pid_n = tile_indices(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_begin, k_end = split_k_range(K, SPLIT_K, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    x_cols = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm  # [1, BLOCK_M]: x.T's columns
    w_rows = qweight_ptr + offs_n.to(tl.int64)[:, None] * stride_qn  # [BLOCK_N, 1]
    offs_h = tl.arange(0, BLOCK_K // 2)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # out.T's tile
    offs_w = tl.arange(0, max(BLOCK_K // 8, 1))
    w_words = w_rows.to(tl.pointer_type(tl.int32), bitcast=True)
    plane_q = tl.arange(0, max(BLOCK_K // 4, 1))
    plane_cols = 8 * (plane_q // 2) + 4 * (plane_q % 2)  # the columns of plane i (pairs i, i + 4 of a word), minus i
    for k0 in range(k_begin, k_end, BLOCK_K):
        k0 = tile_start(k0, BLOCK_K)
        ks = k0 + offs_k
        x_t = tl.load(x_cols + ks[:, None], mask=in_k(ks, K, EVEN_K)[:, None] & mask_m[None, :], other=0.0)
        if WORDS and PLANES:
            w_mask = mask_n[:, None] & in_k(k0 + 8 * offs_w, K, EVEN_K)[None, :]
            words = tl.load(w_words + (k0 // 8 + offs_w)[None, :], mask=w_mask, other=0)
            offset = tl.full((BLOCK_N, BLOCK_K // 4), CODE_BITS + 8 if SYMMETRIC else CODE_BITS, tl.int16)
            part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for i in tl.static_range(4):
                codes = code_pairs(words, i, CODE_DTYPE, CODE_BITS) - offset.to(CODE_DTYPE, bitcast=True)
                kp = k0 + plane_cols + i
                x_i = tl.load(x_cols + kp[:, None], mask=in_k(kp, K, EVEN_K)[:, None] & mask_m[None, :], other=0.0)
                part = tl.dot(codes.to(DOT_DTYPE), x_i.to(DOT_DTYPE), part, input_precision=DOT_PRECISION)
                if not SYMMETRIC:
                    x_sum += tl.sum(x_i.to(tl.float32), axis=0)
            meta = offs_n * stride_sn + k0 // GROUP_SIZE
            scale = tl.load(scales_ptr + meta, mask=mask_n, other=0.0)[:, None]
            if not SYMMETRIC:
                part -= tl.load(zeros_ptr + meta, mask=mask_n, other=0.0)[:, None] * x_sum[None, :]
            acc += part * scale
        elif WORDS:
            w_mask = mask_n[:, None] & in_k(k0 + 8 * offs_w, K, EVEN_K)[None, :]
            words = tl.load(w_words + (k0 // 8 + offs_w)[None, :], mask=w_mask, other=0)
            codes = word_codes(words, CODE_DTYPE, CODE_BITS, CODE_BITS + 8 if SYMMETRIC else CODE_BITS)
            part = tl.dot(codes.to(DOT_DTYPE), x_t.to(DOT_DTYPE), input_precision=DOT_PRECISION)
            meta = offs_n * stride_sn + k0 // GROUP_SIZE
            scale = tl.load(scales_ptr + meta, mask=mask_n, other=0.0)[:, None]
            if not SYMMETRIC and not TILE_SUMS:  # with TILE_SUMS the zero terms come after the loop, in dots
                zero = tl.load(zeros_ptr + meta, mask=mask_n, other=0.0)[:, None]
                part -= zero * tl.sum(x_t.to(tl.float32), axis=0)[None, :]
            acc += part * scale
        else:
            k_even = k0 + 2 * offs_h
            k_mask = in_k(k_even, K, EVEN_K)
            packed = tl.load(w_rows + (k0 // 2 + offs_h)[None, :], mask=mask_n[:, None] & k_mask[None, :],
                             other=0).to(tl.int32)  # fmt: skip
            scale, shift = group_meta(scales_ptr, zeros_ptr, offs_n, mask_n, k_even, k_mask, stride_sn, k0,
                                      GROUP_SIZE, SYMMETRIC, GROUP_ALIGNED)  # fmt: skip
            scale, shift = tl.trans(scale), tl.trans(shift)  # [BLOCK_N, 1] or [BLOCK_N, BLOCK_K / 2]
            low = bits_as_float(packed & 0xF, 0.0) * scale - shift
            high = bits_as_float((packed >> 4) & 0xF, 0.0) * scale - shift
            weight = tl.reshape(tl.join(low.to(DOT_DTYPE), high.to(DOT_DTYPE)), (BLOCK_N, BLOCK_K))
            acc = tl.dot(weight, x_t.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
    if WORDS and TILE_SUMS and not PLANES:  # the plane form subtracts its zero terms in the loop
        acc = minus_zero_terms(acc, scales_ptr, zeros_ptr, sums_ptr, offs_n, mask_n, offs_m, mask_m, M, stride_sn,
                               k_begin, k_end, BLOCK_K, GROUP_SIZE)  # fmt: skip
    acc = tl.trans(acc)
    acc += load_bias(bias_ptr, offs_n, N, HAS_BIAS, BLOCK_N)
    store_tile(out_ptr, acc, offs_m, offs_n, M, N, stride_om, work_ptr, count_ptr, SPLIT_K, SPLIT)


#: K tiles whose zero terms one dot of :func:`minus_zero_terms` takes (a dot's inner size is at least 16)
ZERO_TILES = tl.constexpr(32)


@triton.jit
def minus_zero_terms(acc, scales_ptr, zeros_ptr, sums_ptr, offs_n, mask_n, offs_m, mask_m, M, stride_sn, k_begin,
                     k_end, BLOCK_K: tl.constexpr, GROUP_SIZE: tl.constexpr):  # fmt: skip
    """``acc [BLOCK_N, BLOCK_M]`` minus the asymmetric word-form dot's zero terms over the K tiles ``t`` of
    ``[k_begin, k_end)``: ``sum_t zero[n, t] * scale[n, t] * x_sum[t, m]``, as dots of ``ZERO_TILES`` tiles at a
    time (``tf32x3``: three tensor-core passes that keep fp32's precision) instead of one FMA per output element in
    every K tile. ``x_sum`` is the ``[cdiv(K, BLOCK_K), M]`` output of :func:`tile_sums_kernel`; ``BLOCK_K`` divides
    the group, so tile ``t`` has the scale and zero of group ``t * BLOCK_K // GROUP_SIZE``."""
    offs_t = tl.arange(0, ZERO_TILES)
    t_end = tl.cdiv(k_end, BLOCK_K)
    for t0 in range(k_begin // BLOCK_K, t_end, ZERO_TILES):
        ts = t0 + offs_t
        mask_t = ts < t_end
        meta = offs_n[:, None] * stride_sn + (ts * BLOCK_K // GROUP_SIZE)[None, :]
        mask_w = mask_n[:, None] & mask_t[None, :]
        shift = tl.load(zeros_ptr + meta, mask=mask_w, other=0.0) * tl.load(scales_ptr + meta, mask=mask_w, other=0.0)
        mask_s = mask_t[:, None] & mask_m[None, :]
        x_sum = tl.load(sums_ptr + ts[:, None] * M + offs_m[None, :], mask=mask_s, other=0.0)
        acc = tl.dot(-shift, x_sum, acc, input_precision="tf32x3")
    return acc


@triton.jit
def tile_sums_kernel(x_ptr, out_ptr, M, K, stride_xm, WIDTH: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_S: tl.constexpr):  # fmt: skip
    """``out[t, m] = sum(x[m, t*WIDTH : (t+1)*WIDTH])`` in fp32 (columns past K count as zeros), ``out``
    ``[cdiv(K, WIDTH), M]`` (rows of a tile side by side: the dot kernel loads them as vectors): the activation sums
    of the asymmetric word-form dot's K tiles. Grid: ``(M, cdiv(T, BLOCK_T))``; ``BLOCK_S >= WIDTH``, powers of two."""
    tiles = tl.cdiv(K, WIDTH)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = tl.arange(0, BLOCK_S)
    ks = offs_t[:, None] * WIDTH + offs_s[None, :]
    mask = (offs_s[None, :] < WIDTH) & (ks < K)
    x = tl.load(x_ptr + tl.program_id(0).to(tl.int64) * stride_xm + ks, mask=mask, other=0.0)
    sums = tl.sum(x.to(tl.float32), axis=1)
    tl.store(out_ptr + offs_t.to(tl.int64) * M + tl.program_id(0), sums, mask=offs_t < tiles)


@triton.jit
def rows_dot(x_even, x_odd, low, high, BLOCK_M: tl.constexpr):
    """``x_even @ low.T + x_odd @ high.T`` as ``[BLOCK_M, BLOCK_N]`` for ``x_* [BLOCK_M, B]``, ``low/high
    [BLOCK_N, B]``: one row is a 2-D product reduced along B (no 3-D broadcast)."""
    if BLOCK_M == 1:
        return tl.sum(x_even * low + x_odd * high, axis=1)[None, :]
    return tl.sum(x_even[:, None, :] * low[None, :, :] + x_odd[:, None, :] * high[None, :, :], axis=2)


#: ``words_dot`` sums ``c * x * 2**-DENORMAL_SHIFT``: the activation is scaled up by ``2**(149 - DENORMAL_SHIFT)``
DENORMAL_SHIFT = tl.constexpr(64)


@triton.jit
def words_dot(words, x_rows, mask_m, k_first, K, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """``sum_k x_k c_k * 2**-DENORMAL_SHIFT`` as ``[BLOCK_M, BLOCK_N]`` over a tile of int32
    ``words [BLOCK_N, BLOCK_W]`` (8 nibble codes ``c`` each, for columns ``k_first [BLOCK_W] + 0..7``).

    A nibble costs one AND and one fused multiply-add. Masked in place, ``words & (0xF << 4i)`` is a float32 bit
    pattern below ``2**24``, whose value is exactly ``c * 16**i * 2**-149`` (a subnormal, or the smallest normal
    binade, where float value and bit pattern are proportional); nibbles 6 and 7 are shifted down by 12 bits
    first. The activation is scaled by ``2**(149 - DENORMAL_SHIFT) / 16**i`` to match (exact: a power of two),
    once per tile for all the rows of the tile, so every product is ``c * x * 2**-DENORMAL_SHIFT`` as in float64.
    GPUs keep subnormal operands of ``fma.rn.f32`` (triton does not flush them). Range: ``|x| < 2**42`` (larger
    activations overflow to inf, visibly), and terms with ``|c x| < 2**-62`` lose relative precision.
    """
    upper = words.to(tl.uint32, bitcast=True) >> 12
    elem = tl.zeros((BLOCK_M, words.shape[0], words.shape[1]), dtype=tl.float32)
    elem1 = tl.zeros(words.shape, dtype=tl.float32)  # the same for one row, kept 2-D
    for i in tl.static_range(8):
        if i < 6:
            unit = 16**i
            bits = words & (0xF * unit)
        else:
            unit = 16 ** (i - 3)
            bits = (upper & (0xF * unit)).to(tl.int32, bitcast=True)
        code = bits.to(tl.float32, bitcast=True)
        ks = k_first + i
        x = tl.load(x_rows + ks[None, :], mask=mask_m[:, None] & in_k(ks, K, EVEN_K)[None, :], other=0.0)
        x_scaled = x.to(tl.float32) * ((2.0 ** (149 - DENORMAL_SHIFT)) / unit)
        if BLOCK_M == 1:
            elem1 += code * x_scaled
        else:
            elem += code[None, :, :] * x_scaled[:, None, :]
    if BLOCK_M == 1:
        return tl.sum(elem1, axis=1)[None, :]
    return tl.sum(elem, axis=2)


@triton.jit
def int4_gemv_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, work_ptr, count_ptr,
    M, N, K, SPLIT_K, stride_xm, stride_qn, stride_sn, stride_om,
    GROUP_SIZE: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_ALIGNED: tl.constexpr,
    SPLIT: tl.constexpr, EVEN_K: tl.constexpr, EVEN_M: tl.constexpr, WORDS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``out[M, N] = x[M, K] @ dequant(qweight).T + bias`` for a few rows (``BLOCK_M <= 4``), without ``tl.dot``.

    The tile is ``[BLOCK_N, BLOCK_K / 2]`` packed bytes with the weight's rows along the contiguous axis, so a
    thread loads 16 bytes at once. When the tile lies in one group (``GROUP_ALIGNED``) the scale is applied once
    per tile and row, not per weight: ``sum_k x_k (c_k - z) s = s * sum_k x_k c_k - s z * sum_k x_k``.
    The zero (8 when ``SYMMETRIC``) enters through the tile's activation sum in the same way.
    ``WORDS`` (needs ``GROUP_ALIGNED``, 4-byte aligned rows): the tile is read as int32 words and each nibble costs
    one AND and one fused multiply-add (:func:`words_dot`); otherwise bytes, split into their two nibbles, with the
    scales gathered per weight when a tile spans groups.
    Same arguments and grid as :func:`int4_linear_kernel` (no ``GROUP_M``), plus ``EVEN_M`` (M a multiple of
    BLOCK_M: activation loads need no row mask).
    """
    pid_m, pid_n = tile_indices(M, N, BLOCK_M, BLOCK_N, 1)
    k_begin, k_end = split_k_range(K, SPLIT_K, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = tl.full((BLOCK_M,), 1, tl.int1) if EVEN_M else offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
    w_rows = qweight_ptr + offs_n.to(tl.int64)[:, None] * stride_qn  # [BLOCK_N, 1]
    offs_b = tl.arange(0, BLOCK_K // 2)
    offs_w = tl.arange(0, max(BLOCK_K // 8, 1))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k0 = tile_start(k0, BLOCK_K)
        if WORDS:
            k_first = k0 + 8 * offs_w
            w_mask = mask_n[:, None] & in_k(k_first, K, EVEN_K)[None, :]
            words = tl.load(w_rows.to(tl.pointer_type(tl.int32), bitcast=True) + (k0 // 8 + offs_w)[None, :],
                            mask=w_mask, other=0)  # fmt: skip
            ks = k0 + tl.arange(0, BLOCK_K)  # the tile's activations once more, contiguous, for their sum
            x_tile = tl.load(x_rows + ks[None, :], mask=mask_m[:, None] & in_k(ks, K, EVEN_K)[None, :], other=0.0)
            x_sum = tl.sum(x_tile.to(tl.float32), axis=1)
            part = words_dot(words, x_rows, mask_m, k_first, K, EVEN_K, BLOCK_M) * (2.0**DENORMAL_SHIFT)
        else:
            k_even = k0 + 2 * offs_b
            k_mask = in_k(k_even, K, EVEN_K)
            packed = tl.load(w_rows + (k0 // 2 + offs_b)[None, :], mask=mask_n[:, None] & k_mask[None, :],
                             other=0).to(tl.int32)  # fmt: skip
            x_even = tl.load(x_rows + k_even[None, :], mask=mask_m[:, None] & k_mask[None, :], other=0.0)
            x_odd = tl.load(x_rows + k_even[None, :] + 1,
                            mask=mask_m[:, None] & in_k(k_even + 1, K, EVEN_K)[None, :], other=0.0)  # fmt: skip
            x_even, x_odd = x_even.to(tl.float32), x_odd.to(tl.float32)
            x_sum = tl.sum(x_even + x_odd, axis=1)
            if GROUP_ALIGNED:
                low = bits_as_float(packed & 0xF, 0.0)
                high = bits_as_float((packed >> 4) & 0xF, 0.0)
                part = rows_dot(x_even, x_odd, low, high, BLOCK_M)
            else:
                scale, shift = group_meta(scales_ptr, zeros_ptr, offs_n, mask_n, k_even, k_mask, stride_sn, k0,
                                          GROUP_SIZE, SYMMETRIC, False)  # fmt: skip
                scale, shift = tl.trans(scale), tl.trans(shift)
                low = bits_as_float(packed & 0xF, 0.0) * scale - shift
                high = bits_as_float((packed >> 4) & 0xF, 0.0) * scale - shift
                acc += rows_dot(x_even, x_odd, low, high, BLOCK_M)
        if GROUP_ALIGNED:
            meta = offs_n * stride_sn + k0 // GROUP_SIZE
            scale = tl.load(scales_ptr + meta, mask=mask_n, other=0.0)[None, :]
            if SYMMETRIC:
                zero = 8.0
            else:
                zero = tl.load(zeros_ptr + meta, mask=mask_n, other=0.0)[None, :]
            acc += (part - x_sum[:, None] * zero) * scale
    acc += load_bias(bias_ptr, offs_n, N, HAS_BIAS, BLOCK_N)
    store_tile(out_ptr, acc, offs_m, offs_n, M, N, stride_om, work_ptr, count_ptr, SPLIT_K, SPLIT)


@triton.jit
def int4_dequantize_kernel(
    qweight_ptr, scales_ptr, zeros_ptr, out_ptr, N, K, stride_qn, stride_sn, stride_on,
    GROUP_SIZE: tl.constexpr, SYMMETRIC: tl.constexpr, GROUP_ALIGNED: tl.constexpr, WORDS: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``out[N, K] = (code - zero) * scale`` in out's dtype: the weight for a cuBLAS GEMM at large M.

    Bytes: one vector load of ``[BLOCK_N, BLOCK_K / 2]``, low and high nibbles interleaved back in registers
    (``tl.join``); ``WORDS``: int32 words, 8 nibble planes joined back. Stored along K.
    Grid: ``(cdiv(N, BLOCK_N), cdiv(K, BLOCK_K))``.
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)[:, None]
    if WORDS:  # 8 planes of [BLOCK_N, BLOCK_K / 8], interleaved back by three rounds of joins
        kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        k_first = kw * 8
        w_mask = in_k(k_first, K, EVEN_K)
        words = tl.load((qweight_ptr + rows * stride_qn).to(tl.pointer_type(tl.int32), bitcast=True) + kw[None, :],
                        mask=mask_n[:, None] & w_mask[None, :], other=0)  # fmt: skip
        scale, shift = group_meta(scales_ptr, zeros_ptr, offs_n, mask_n, k_first, w_mask, stride_sn, k0,
                                  GROUP_SIZE, SYMMETRIC, GROUP_ALIGNED)  # fmt: skip
        scale, shift = tl.trans(scale), tl.trans(shift)
        p0 = plane(words, 0) * scale - shift
        p1 = plane(words, 1) * scale - shift
        p2 = plane(words, 2) * scale - shift
        p3 = plane(words, 3) * scale - shift
        p4 = plane(words, 4) * scale - shift
        p5 = plane(words, 5) * scale - shift
        p6 = plane(words, 6) * scale - shift
        p7 = plane(words, 7) * scale - shift
        # element 8j + 4a + 2b + c sits at [.., j, a, b, c]: join over a first, then b, then c (the fastest)
        evens = tl.join(tl.join(p0, p4), tl.join(p2, p6))
        odds = tl.join(tl.join(p1, p5), tl.join(p3, p7))
        weight = tl.reshape(tl.join(evens, odds), (BLOCK_N, BLOCK_K))
    else:
        offs_h = tl.arange(0, BLOCK_K // 2)
        k_even = k0 + 2 * offs_h
        k_mask = in_k(k_even, K, EVEN_K)
        packed = tl.load(qweight_ptr + rows * stride_qn + (k0 // 2 + offs_h)[None, :],
                         mask=mask_n[:, None] & k_mask[None, :], other=0).to(tl.int32)  # fmt: skip
        scale, shift = group_meta(scales_ptr, zeros_ptr, offs_n, mask_n, k_even, k_mask, stride_sn, k0,
                                  GROUP_SIZE, SYMMETRIC, GROUP_ALIGNED)  # fmt: skip
        scale, shift = tl.trans(scale), tl.trans(shift)  # [BLOCK_N, 1] or [BLOCK_N, BLOCK_K / 2]
        low = bits_as_float(packed & 0xF, 0.0) * scale - shift
        high = bits_as_float((packed >> 4) & 0xF, 0.0) * scale - shift
        weight = tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K))
    mask = mask_n[:, None] & in_k(offs_k, K, EVEN_K)[None, :]
    tl.store(out_ptr + rows * stride_on + offs_k[None, :], weight.to(out_ptr.dtype.element_ty), mask=mask)
