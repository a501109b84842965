"""The ``@triton.jit`` kernel of the ``gguf`` family (launcher and rows: :mod:`qcompile.codegen.triton.gguf`).

One GEMM kernel for every ggml block type; the type is a ``constexpr`` (its ggml type id), so each launch compiles
only its own decoder. The weight is ``blocks uint8 [N, (KP / QK) * NBYTES]``, ggml's block bytes row by row; byte
layouts, element orders and formulas are those of :mod:`qcompile.schemes.gguf_blocks`.

**Planes.** Every type keeps its low code bits in one array of ``QB`` bytes per block at byte ``QS`` (``qs``, Q6_K's
``ql``), and each byte holds ``P`` codes (``P`` = ``QK / QB``: 1 for Q8_0, 2 for nibbles, 4 for Q2_K/Q3_K crumbs).
The tile's code bytes ``[BLOCK_N, BLOCK_K / P]`` are loaded once, in byte order (runs of ``QB`` contiguous bytes,
so the loads are as wide as the block alignment allows), and plane ``p`` (bits ``p * 8 / P ..`` of every byte) is
its own ``tl.dot`` against the activation columns it belongs to (:func:`plane_elements`: runs of 16 or 32
contiguous columns). So no code is moved between lanes and no byte is loaded twice; only the high-bit planes
(``qh`` of Q5_0/Q5_1/Q5_K/Q6_K, ``hmask`` of Q3_K) are gathered per code. Within a plane, runs of ``SUB`` bytes
share one sub-block scale (:func:`plane_sub_block` gives its index in the block).

**Values.** fp16 fields are two bytes joined into fp16 bits (``lo | hi << 8``) and bit-cast; codes become floats
without int→float conversions (``tiles.bits_as_float``); IQ4 levels come from four int32 constants holding
``KVALUES + 127`` a byte each. The fp32 tile is the reference's dequantization bit for bit: ``factor * v (+
offset)`` with ``factor`` per sub-block (``d``, ``d * sc``, ``d * (sc - 32)``), ``v`` the code minus its offset or
the IQ4 level, ``offset`` ``m`` (Q4_1, Q5_1) or ``-(dmin * m)`` (K-quants): the operations and order of
``gguf_blocks`` (every product before a rounding is exact in fp32, so an FMA the compiler may form changes
nothing). It is cast to the activation's dtype for the dot, as the reference casts its weight.
"""

from __future__ import annotations

import triton
import triton.language as tl

from qcompile.codegen.triton.tiles import bits_as_float, load_bias, split_k_range, store_tile, tile_indices, tile_start
from qcompile.schemes.gguf_blocks import KVALUES

# ggml type ids (``gguf_blocks.BLOCK_TYPES[...].type_id``)
Q4_0 = tl.constexpr(2)
Q4_1 = tl.constexpr(3)
Q5_0 = tl.constexpr(6)
Q5_1 = tl.constexpr(7)
Q8_0 = tl.constexpr(8)
Q2_K = tl.constexpr(10)
Q3_K = tl.constexpr(11)
Q4_K = tl.constexpr(12)
Q5_K = tl.constexpr(13)
Q6_K = tl.constexpr(14)
IQ4_NL = tl.constexpr(20)
IQ4_XS = tl.constexpr(23)


def level_words() -> tuple[int, ...]:
    """``KVALUES + 127`` (0 .. 240), four to a little-endian int32 word (as signed int32)."""
    words = []
    for i in range(0, 16, 4):
        word = sum((KVALUES[i + b] + 127) << (8 * b) for b in range(4))
        words.append(word - (1 << 32) if word >= 1 << 31 else word)
    return tuple(words)


LEVELS_0, LEVELS_1, LEVELS_2, LEVELS_3 = (tl.constexpr(w) for w in level_words())


# -- bytes ------------------------------------------------------------------------------------------------------------
@triton.jit
def load_byte(ptrs, mask):
    """The bytes at ``ptrs`` as int32 (0 where masked)."""
    return tl.load(ptrs, mask=mask, other=0).to(tl.int32)


@triton.jit
def load_half(ptrs, mask):
    """The little-endian fp16 at ``ptrs`` (two bytes) as fp32: the bits joined, then bit-cast."""
    bits = load_byte(ptrs, mask) | (load_byte(ptrs + 1, mask) << 8)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def iq4_level(q):
    """``KVALUES[q]`` as fp32 for int32 codes ``q`` in ``[0, 16)``: byte ``q % 4`` of word ``q // 4``, minus 127."""
    word = tl.where(q < 8, tl.where(q < 4, LEVELS_0, LEVELS_1), tl.where(q < 12, LEVELS_2, LEVELS_3))
    return bits_as_float((word >> ((q & 3) * 8)) & 255, 127)


@triton.jit
def round_to_bf16(v):
    """fp32 ``v`` (finite) rounded to the nearest bf16, ties to even, kept in fp32: what the cast to bf16 does on a
    GPU. The interpreter's cast truncates, so there the kernel rounds with this before its fp32 dot."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


# -- planes -----------------------------------------------------------------------------------------------------------
@triton.jit
def plane_elements(TYPE: tl.constexpr, p: tl.constexpr, b):
    """Index within its block of the element that plane ``p`` of code byte ``b`` (int32, ``0 <= b < QB``) holds."""
    if TYPE == Q4_0 or TYPE == Q4_1 or TYPE == Q5_0 or TYPE == Q5_1 or TYPE == IQ4_NL:
        e = b + 16 * p  # low nibbles are elements 0-15, high ones 16-31
    elif TYPE == Q8_0:
        e = b
    elif TYPE == Q2_K or TYPE == Q3_K:
        e = (b // 32) * 128 + 32 * p + b % 32  # qs[32h + l] bits 2s: element 128h + 32s + l
    elif TYPE == Q4_K or TYPE == Q5_K:
        e = (b // 32) * 64 + 32 * p + b % 32  # qs[32c + l] nibble n: element 64c + 32n + l
    elif TYPE == Q6_K:
        e = (b // 64) * 128 + 64 * p + b % 64  # ql[64h + 32t + l] nibble n: element 128h + 32(2n + t) + l
    else:
        tl.static_assert(TYPE == IQ4_XS, "gguf_linear_kernel: unsupported ggml type id")
        e = (b // 16) * 32 + 16 * p + b % 16  # qs[16j + l] nibble n: element 32j + 16n + l
    return e


@triton.jit
def plane_sub_block(TYPE: tl.constexpr, p: tl.constexpr, r):
    """Sub-block (scale index within the block) of run ``r`` (int32; runs of ``SUB`` code bytes) of plane ``p``."""
    if TYPE == Q2_K or TYPE == Q3_K:
        j = (r >> 1) * 8 + 2 * p + (r & 1)  # 16-byte runs: h = r // 2, l // 16 = r % 2; j = 8h + 2s + l // 16
    elif TYPE == Q4_K or TYPE == Q5_K:
        j = 2 * r + p  # 32-byte runs: c = r; j = 2c + n
    elif TYPE == Q6_K:
        j = (r >> 2) * 8 + 4 * p + (r & 3)  # 16-byte runs: h = r // 4, t = r // 2 % 2, l // 16 = r % 2
    else:
        j = r  # IQ4_XS: 16-byte runs, j = r; the legacy types: one run, one scale a block
    return j


@triton.jit
def plane_values(TYPE: tl.constexpr, p: tl.constexpr, codes, blocks, b, mask):
    """``v`` fp32 ``[BLOCK_N, BLOCK_K / P]``: plane ``p`` of the code bytes ``codes`` (int32, same shape; ``b`` the
    byte index in the block, ``[1, BLOCK_K / P]``), with high bits gathered from the blocks at ``blocks``."""
    if TYPE == Q8_0:
        v = bits_as_float(codes ^ 128, 128)  # the int8 qs[e]
    elif TYPE == Q2_K or TYPE == Q3_K:
        q = (codes >> (2 * p)) & 3
        if TYPE == Q2_K:
            v = bits_as_float(q, 0)
        else:  # hmask[l] bit (element // 32 = 4h + s) is bit 2; here l = b % 32, h = b // 32
            high = (load_byte(blocks + (b & 31), mask) >> ((b >> 5) * 4 + p)) & 1
            v = bits_as_float(q | (high << 2), 4)
    else:
        q = (codes >> (4 * p)) & 15
        if TYPE == Q5_0 or TYPE == Q5_1:  # bit (e = 16p + b) of the u32 qh just before qs is bit 4
            qh = 2 if TYPE == Q5_0 else 4
            q = q | (((load_byte(blocks + qh + 2 * p + (b >> 3), mask) >> (b & 7)) & 1) << 4)
        elif TYPE == Q5_K:  # qh[l] bit (element // 32 = 2c + n) is bit 4; l = b % 32, c = b // 32
            q = q | (((load_byte(blocks + 16 + (b & 31), mask) >> ((b >> 5) * 2 + p)) & 1) << 4)
        elif TYPE == Q6_K:  # qh[32h + l] bits 2s (s = 2n + t) are bits 4-5; h = b // 64, t = b // 32 % 2
            shift = ((b >> 5) & 1) * 2 + 4 * p
            q = q | (((load_byte(blocks + 128 + ((b >> 6) << 5) + (b & 31), mask) >> shift) & 3) << 4)
        if TYPE == Q4_0:
            v = bits_as_float(q, 8)
        elif TYPE == Q5_0:
            v = bits_as_float(q, 16)
        elif TYPE == Q6_K:
            v = bits_as_float(q, 32)
        elif TYPE == IQ4_NL or TYPE == IQ4_XS:
            v = iq4_level(q)
        else:
            v = bits_as_float(q, 0)
    return v


@triton.jit
def sub_block_scales(TYPE: tl.constexpr, blocks, j, mask):
    """``(factor, offset)`` fp32 ``[BLOCK_N, R]`` of sub-block ``j`` (int32 ``[1, R]``, index within its block) of the
    blocks at ``blocks``: ``w = factor * v + offset`` (``offset`` zero, and unused, where the type has no min)."""
    offset = tl.zeros(blocks.shape, dtype=tl.float32)
    if TYPE == Q4_0 or TYPE == Q5_0 or TYPE == Q8_0 or TYPE == IQ4_NL:
        factor = load_half(blocks, mask)
    elif TYPE == Q4_1 or TYPE == Q5_1:
        factor = load_half(blocks, mask)
        offset = load_half(blocks + 2, mask)
    elif TYPE == Q2_K:
        scale = load_byte(blocks + j, mask)  # low nibble sc, high nibble m
        factor = load_half(blocks + 80, mask) * bits_as_float(scale & 15, 0)
        offset = -(load_half(blocks + 82, mask) * bits_as_float(scale >> 4, 0))
    elif TYPE == Q3_K:
        # low 4 bits: nibble j // 8 of scales[j % 8]; high 2 bits: bits 2(j // 4) of scales[8 + j % 4]
        low = (load_byte(blocks + 96 + (j & 7), mask) >> ((j >> 3) * 4)) & 15
        high = (load_byte(blocks + 104 + (j & 3), mask) >> ((j >> 2) * 2)) & 3
        factor = load_half(blocks + 108, mask) * bits_as_float(low | (high << 4), 32)
    elif TYPE == Q4_K or TYPE == Q5_K:
        # get_scale_min_k4 on scales = bytes 4 .. 15: s0 = scales[j % 4], s1 = scales[j % 4 + 4], s2 = scales[j + 4]
        s0 = load_byte(blocks + 4 + (j & 3), mask)
        s1 = load_byte(blocks + 8 + (j & 3), mask)
        s2 = load_byte(blocks + 8 + j, mask)
        first = j < 4
        sc = tl.where(first, s0 & 63, (s2 & 15) | ((s0 >> 6) << 4))
        m = tl.where(first, s2 & 63, (s2 >> 4) | ((s1 >> 6) << 4))
        factor = load_half(blocks, mask) * bits_as_float(sc, 0)
        offset = -(load_half(blocks + 2, mask) * bits_as_float(m, 0))
    elif TYPE == Q6_K:
        factor = load_half(blocks + 208, mask) * bits_as_float(load_byte(blocks + 192 + j, mask) ^ 128, 128)
    else:
        tl.static_assert(TYPE == IQ4_XS, "gguf_linear_kernel: unsupported ggml type id")
        # ls = nibble j % 2 of scales_l[j // 2] | (bits 2(j % 4) of scales_h byte j // 4) << 4
        low = (load_byte(blocks + 4 + (j >> 1), mask) >> ((j & 1) * 4)) & 15
        high = (load_byte(blocks + 2 + (j >> 2), mask) >> ((j & 3) * 2)) & 3
        factor = load_half(blocks, mask) * bits_as_float(low | (high << 4), 32)
    return factor, offset


@triton.jit
def gguf_linear_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, work_ptr, count_ptr,
    M, N, K, NB, SPLIT_K, stride_xm, stride_wn, stride_om,
    TYPE: tl.constexpr, QK: tl.constexpr, NBYTES: tl.constexpr, QS: tl.constexpr, QB: tl.constexpr,
    SUB: tl.constexpr, HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``out[M, N] = x[M, K] @ dequant(blocks)[N, K].T + bias[N]``.

    ``x`` fp16/bf16/fp32 rows with unit stride along K; ``w`` uint8 ``[N, NB * NBYTES]``: ``NB`` ggml blocks of type
    ``TYPE`` a row (``QK`` elements, ``NBYTES`` bytes each, code bytes ``QS .. QS + QB``; the padding past ``K``
    meets no activation); ``bias`` ``[N]``; ``out`` ``[M, N]`` float. Per ``BLOCK_K`` step, the code bytes of the
    ``[BLOCK_N, BLOCK_K / QK]`` blocks are loaded once and each of the ``QK / QB`` planes is decoded in fp32 to
    ``[BLOCK_N, BLOCK_K * QB / QK]``, cast to ``DOT_DTYPE`` (the activation's dtype) and multiplied by its activation
    columns with ``tl.dot``, fp32 accumulation. Grid: ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K)``; blocks
    ``>= 16``, ``BLOCK_K`` a multiple of ``QK``. ``EVEN_K``: ``K`` a multiple of ``BLOCK_K`` (no bounds mask along
    K on the activation). ``ROUND_BF16``: round the tile to bf16 in fp32 before an fp32 dot (bf16 activations under
    the interpreter, whose bf16 dots and casts are wrong). Split-K partial sums meet in the fp32 workspace
    (``tiles.store_tile``).
    """
    P: tl.constexpr = QK // QB
    PL: tl.constexpr = BLOCK_K // P  # code bytes of a tile's row, elements of each plane
    pid_m, pid_n = tile_indices(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_begin, k_end = split_k_range(K, SPLIT_K, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    i = tl.arange(0, PL)
    b = i % QB  # code byte within its block
    runs = tl.arange(0, PL // SUB)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_tile = tile_start(k0, BLOCK_K)
        blk = k_tile // QK + i // QB
        mask = mask_n[:, None] & (blk < NB)[None, :]
        blocks = w_rows + (blk * NBYTES)[None, :]
        codes = tl.load(blocks + QS + b[None, :], mask=mask, other=0).to(tl.int32)
        run_blk = k_tile // QK + runs // (QB // SUB)
        run_mask = mask_n[:, None] & (run_blk < NB)[None, :]
        run_blocks = w_rows + (run_blk * NBYTES)[None, :]
        for p in tl.static_range(P):
            ks = k_tile + (i // QB) * QK + plane_elements(TYPE, p, b)
            if EVEN_K:
                a = tl.load(x_rows + ks[None, :], mask=mask_m[:, None], other=0.0)
            else:
                a = tl.load(x_rows + ks[None, :], mask=mask_m[:, None] & (ks < K)[None, :], other=0.0)
            v = plane_values(TYPE, p, codes, blocks, b[None, :], mask)
            j = plane_sub_block(TYPE, p, runs % (QB // SUB))
            factor, offset = sub_block_scales(TYPE, run_blocks, j[None, :], run_mask)
            w = tl.reshape(v, (BLOCK_N, PL // SUB, SUB)) * factor[:, :, None]
            if HAS_MIN:
                w = w + offset[:, :, None]
            w = tl.reshape(w, (BLOCK_N, PL))
            if ROUND_BF16:
                w = round_to_bf16(w)
            acc = tl.dot(a.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=DOT_PRECISION)
    y = acc + load_bias(bias_ptr, offs_n, N, HAS_BIAS, BLOCK_N)
    store_tile(out_ptr, y, offs_m, offs_n, M, N, stride_om, work_ptr, count_ptr, SPLIT_K, SPLIT)
