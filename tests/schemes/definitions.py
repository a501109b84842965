"""Every registered scheme family written out from its published definition, in float64, from the packed tensors.

Nothing here calls qcompile to decode: bytes and bits are read with numpy in the element order the scheme modules
and ``qcompile/schemes/packing.py`` document, and every value is computed from the format's definition. The test
``test_reference_definitions.py`` compares ``qcompile::linear`` with :func:`linear`.

One :class:`Definition` per family (:data:`DEFINITIONS`, keyed by family name). For an ``[N, K]`` weight packed as
``tensors`` (the op's list, in declared order) and float activations ``x [M, K]``:

* ``weight(scheme, tensors, N, K)`` → float64 ``[N, Kp]``: the weight the activation meets (in the Hadamard basis
  for a rotated FP4 scheme, padding columns included);
* ``activations(scheme, x)`` → float64 ``(values [M, Kp], step [M, Kp])``: the activation the weight meets (padded,
  rotated, quantized where the scheme quantizes it) and, per element, how far its value moves if a rounding that
  lies within :data:`TIE` of a tie went the other way (0 elsewhere): an implementation computing in float32 may
  legitimately break such a near-tie the other way.

Sources: integer grids and packing — the ``qcompile.schemes.integer`` / ``packing`` docstrings; NF4 — QLoRA
(Dettmers et al. 2023, arXiv:2305.14314, Appendix E) and bitsandbytes ``functional.get_4bit_type("nf4")``;
bitsandbytes FP4 — the bit layout commented in ``get_4bit_type("fp4")``;
E4M3 — "FP8 Formats for Deep Learning" (Micikevicius et al. 2022, arXiv:2209.05433; OCP 8-bit FP v1.0): bias 7,
3 mantissa bits, subnormals ``m/8 * 2**-6``, ``S.1111.111`` NaN, no infinities, max 448; E8M0, E2M1 — OCP
Microscaling Formats v1.0 (via ``fp4_definition.py``); NVFP4 — the ``qcompile.schemes.nvfp4`` docstring (NVIDIA's
two-level scaling); fp8-block — DeepSeek-V3 / the ``qcompile.schemes.fp8_block`` docstring; GGUF blocks — decoded by
the peer gguf-py (``gguf.quants.dequantize``, written from ggml's ``dequantize_row_*``); bitsandbytes' flattened
4-bit blocks and double quantization — QLoRA section 3 and bitsandbytes' ``Linear4bit`` state (``QuantState``), its
8-bit dynamic code ``create_dynamic_map``; LLM.int8 — Dettmers et al. 2022 (arXiv:2208.07339) and bitsandbytes'
``int8_vectorwise_quant`` / ``int8_mixed_scaled_mm``; HIGGS — Malinovskii et al. 2024 (arXiv:2411.17525) and the
``qcompile.schemes.higgs`` docstring (layout, scale groups; the grids are data, ``qcompile/data/higgs_grids.json``);
MXFP6 / MXFP8 — OCP Microscaling Formats v1.0 (element types E2M3, E3M2, E4M3, E5M2 decoded bit by bit below, E8M0
block scales of 32) and compressed-tensors' ``pack_fp6_to_uint8`` (fp6 byte order); SpQR — the peer ``spqr_quant``
0.2.0's C++/CUDA sources (bit fields, second-order word, float16 arithmetic; see :func:`spqr_weight`).
Peer families — optimum-quanto 0.2.7 (``tensor/qbits.py``, ``qbytes.py``, ``library/quantize.py``), torchao 0.18
(``quantization/quant_primitives.py``, ``quantize_/workflows``), EETQ (``cutlass_kernels/cutlass_preprocessors.cc``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Callable

import numpy as np
import torch

import fp4_definition as fp4

#: relative distance to a rounding tie within which either rounding is accepted: the implementations compute scales
#: and quotients in float32 (a few roundings of relative 2**-24 each), the definitions here in float64
TIE = 1e-6

#: the 16 NF4 levels, typed in from QLoRA Appendix E / bitsandbytes ``get_4bit_type("nf4")``
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def nf4_construction() -> np.ndarray:
    """The NF4 levels from QLoRA's construction (bitsandbytes ``create_normal_map(0.9677083, use_extra_value=True)``):
    8 positive normal quantiles at ``linspace(0.9677083, 0.5, 9)[:-1]``, 7 negative ones at ``linspace(.., 8)[:-1]``,
    and 0, divided by the largest; float64 (bitsandbytes ran it in float32)."""
    offset = 0.9677083
    ppf = torch.special.ndtri
    positive = ppf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -ppf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (levels / levels.max()).numpy()


# -- reading packed tensors -----------------------------------------------------------------------------------------
def array(tensor: torch.Tensor, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> np.ndarray:
    """The tensor's elements as numpy (float8 as its raw bytes, uint8), after checking its declared shape and dtype."""
    if tuple(tensor.shape) != shape or tensor.dtype != dtype:
        raise AssertionError(f"definitions: packed {name} is {tensor.dtype}{list(tensor.shape)}, the definition "
                             f"expects {dtype}{list(shape)}")  # fmt: skip
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return tensor.contiguous().view(torch.uint8).numpy().copy()
    return tensor.detach().numpy().copy()


def unpack_bits(packed: np.ndarray, bits: int, kp: int) -> np.ndarray:
    """uint8 ``[N, Kp * bits / 8]`` → int64 codes ``[N, Kp]`` (packing docstring: 4 bits: element ``2j`` in bits 0-3 of
    byte ``j``, ``2j+1`` in bits 4-7; 2 bits: element ``4j+i`` in bits ``2i..2i+1`` of byte ``j``; 3 bits: element
    ``8j+i`` in bits ``3i..3i+2`` of the little-endian 24-bit word of bytes ``3j..3j+2``)."""
    b = packed.astype(np.int64)
    n = b.shape[0]
    codes = np.zeros((n, kp), dtype=np.int64)
    if bits == 4:
        codes[:, 0::2], codes[:, 1::2] = b & 0xF, b >> 4
    elif bits == 2:
        for i in range(4):
            codes[:, i::4] = (b >> (2 * i)) & 3
    elif bits == 3:
        words = b[:, 0::3] | (b[:, 1::3] << 8) | (b[:, 2::3] << 16)
        for i in range(8):
            codes[:, i::8] = (words >> (3 * i)) & 7
    else:
        raise ValueError(f"no {bits}-bit packing")
    return codes


def e4m3_decode(b: np.ndarray) -> np.ndarray:
    """float64 values of e4m3fn bytes: sign bit 7, exponent bits 3-6 (bias 7), mantissa bits 0-2; exponent 0 is
    subnormal ``m / 8 * 2**-6``; ``x.1111.111`` is NaN."""
    b = b.astype(np.int64)
    e, m = (b >> 3) & 0xF, b & 7
    magnitude = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * np.exp2(e - 7.0))
    value = np.where(b & 0x80, -magnitude, magnitude)
    return np.where((b & 0x7F) == 0x7F, np.nan, value)


#: the non-negative finite e4m3 values, ascending, indexed by their bits 0x00..0x7E
E4M3_TABLE = e4m3_decode(np.arange(0x7F))
E2M1_TABLE = np.array(fp4.LEVELS)


def round_to_table(values: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round ``values`` (float64) to the nearest entry of ``±table`` (ascending, from 0), ties to the even index (the
    even bit pattern / mantissa bit), saturating at ``table[-1]``: ``(rounded, index, step)`` with ``step`` the gap to
    the other neighbour where the value lies within :data:`TIE` of a tie, else 0."""
    magnitude = np.minimum(np.abs(values), table[-1])
    hi = np.clip(np.searchsorted(table, magnitude), 1, len(table) - 1)
    lo = hi - 1
    d_lo, d_hi = magnitude - table[lo], table[hi] - magnitude
    up = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    index = np.where(up, hi, lo)
    near_tie = np.abs(d_hi - d_lo) <= TIE * np.maximum(magnitude, np.finfo(np.float64).tiny)
    step = np.where(near_tie, table[hi] - table[lo], 0.0)
    return np.copysign(table[index], values), index, step


def round_int(values: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Round half to even and clamp to ``±limit``: ``(rounded, step)`` (step 1 within :data:`TIE` of a tie)."""
    fraction = np.abs(values) - np.floor(np.abs(values))
    near_tie = (np.abs(fraction - 0.5) <= TIE * np.abs(values)) & (np.abs(values) < limit)
    return np.clip(np.round(values), -limit, limit), near_tie.astype(np.float64)


def f32(values) -> np.ndarray:
    """Round to float32 (a float64 operation on float32 inputs rounded once is the float32 operation's result)."""
    return np.asarray(values, dtype=np.float64).astype(np.float32).astype(np.float64)


def pad(x: np.ndarray, kp: int) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, kp - x.shape[1])))


def ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# -- integer grids (int-weight-only, w8a8-int8, w4a8-int) -------------------------------------------------------------
PACK_UNIT = {2: 4, 3: 8, 4: 2, 8: 1}


def int_weight(bits: int, group: int | None, symmetric: bool, tensors, n: int, k: int) -> np.ndarray:
    """``w = (u - zero) * scale`` per group (``zero = 2**(bits-1)`` when symmetric), ``u`` the unsigned code; 8-bit
    codes and zeros are stored signed (``q = u - 128``)."""
    kp = int_kp(bits, group, k)
    groups = kp // (group or kp)
    expected = 2 if symmetric else 3
    if len(tensors) != expected:
        raise AssertionError(f"definitions: int{bits} {'sym' if symmetric else 'asym'} has {expected} packed tensors, "
                             f"got {len(tensors)}")
    if bits == 8:
        u = array(tensors[0], "qweight", (n, kp), torch.int8).astype(np.int64) + 128
    else:
        u = unpack_bits(array(tensors[0], "qweight", (n, kp * bits // 8), torch.uint8), bits, kp)
    scales = array(tensors[1], "scales", (n, groups), torch.float32).astype(np.float64)
    if symmetric:
        zeros = np.full((n, groups), 2.0 ** (bits - 1))
    else:
        zeros = array(tensors[2], "zeros", (n, groups), torch.float32).astype(np.float64) + (128 if bits == 8 else 0)
    per_element = np.repeat(np.arange(groups), kp // groups)
    return (u - zeros[:, per_element]) * scales[:, per_element]


def int8_tokens(x: np.ndarray, kp: int) -> tuple[np.ndarray, np.ndarray]:
    """Per token: ``s = absmax / 127``, ``x_q = clamp(round_half_even(x / s), -127, 127)``; values ``x_q * s``."""
    scale = np.abs(x).max(1, keepdims=True) / 127
    scale = np.where(scale > 0, scale, 1.0)
    codes, step = round_int(x / scale, 127)
    return pad(codes * scale, kp), pad(step * scale, kp)


# -- float8 ---------------------------------------------------------------------------------------------------------
def e4m3_tokens(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp8-w8a8, per token: ``s = absmax / 448``, ``x_q = e4m3(x / s)``; values ``x_q * s``."""
    scale = np.abs(x).max(1, keepdims=True) / 448
    scale = np.where(scale > 0, scale, 1.0)
    rounded, _, step = round_to_table(x / scale, E4M3_TABLE)
    return rounded * scale, step * scale


def block_scale(amax: np.ndarray, ue8m0: bool) -> np.ndarray:
    """fp8-block: float32 ``amax / 448``; ``-ue8m0``: the smallest power of two at or above it; 1 for 0."""
    scale = f32(amax / 448.0)
    if ue8m0:
        mantissa, exponent = np.frexp(scale)
        scale = np.where(mantissa == 0.5, scale, np.ldexp(1.0, exponent))
    return np.where(scale > 0, scale, 1.0)


def fp8_block_tokens(x: np.ndarray, ue8m0: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per token and group of 128 along K: ``s = block_scale(amax)``, ``x_q = e4m3(float32(x / s))``."""
    m, k = x.shape
    x32 = f32(x)
    values, steps = np.zeros((m, k)), np.zeros((m, k))
    for g0 in range(0, k, 128):
        group = x32[:, g0 : g0 + 128]
        scale = block_scale(np.abs(group).max(1, keepdims=True), ue8m0)
        rounded, _, step = round_to_table(f32(group / scale), E4M3_TABLE)
        values[:, g0 : g0 + 128], steps[:, g0 : g0 + 128] = rounded * scale, step * scale
    return values, steps


# -- FP4: E2M1 with E8M0 (mxfp4) or e4m3 + float32 (nvfp4) scales -----------------------------------------------------
def e2m1_values(codes: np.ndarray) -> np.ndarray:
    """Code bit 3 is the sign, bits 0-2 index ``fp4.LEVELS``."""
    return np.where(codes & 8, -1.0, 1.0) * E2M1_TABLE[codes & 7]


#: elements per scale along K: OCP MX v1.0 blocks of 32; NVFP4 blocks of 16
FP4_GROUP = {"mxfp4": 32, "nvfp4": 16}


def fp4_kp(scheme, k: int) -> int:
    """``K`` rounded up to whole groups, or to whole Hadamard blocks when those are larger."""
    return ceil_to(k, max(FP4_GROUP[scheme.family], scheme.rotation or 1))


def fp4_weight(scheme, tensors, n: int, k: int) -> np.ndarray:
    """``e2m1(code) * unit`` per group; mxfp4 ``unit = 2**(s - 127)``; nvfp4 ``unit = float32(e4m3(s) * global)``."""
    kp, group = fp4_kp(scheme, k), FP4_GROUP[scheme.family]
    codes = unpack_bits(array(tensors[0], "qweight", (n, kp // 2), torch.uint8), 4, kp)
    if scheme.family == "mxfp4":
        if len(tensors) != 2:
            raise AssertionError(f"definitions: mxfp4 has 2 packed tensors, got {len(tensors)}")
        s = array(tensors[1], "scales", (n, kp // group), torch.uint8).astype(np.float64)
        unit = np.where(s == 255, np.nan, np.exp2(s - 127))
    else:
        if len(tensors) != 3:
            raise AssertionError(f"definitions: nvfp4 has 3 packed tensors, got {len(tensors)}")
        s = e4m3_decode(array(tensors[1], "scales", (n, kp // group), torch.float8_e4m3fn))
        unit = f32(s * array(tensors[2], "global_scale", (1,), torch.float32).astype(np.float64)[0])
    return e2m1_values(codes) * np.repeat(unit, group, axis=1)


def fp4_tokens(scheme, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x_p @ Hb`` (float64; ``fp4.padded_rotated``), then for ``-w4a4`` per token the weight's rule on its float32
    values: mxfp4 ``unit = 2**clamp(floor(log2(amax)) - 2, -127, 127)`` per 32; nvfp4 ``g = float32(amax(row) / 2688)``
    per token, ``unit = float32(e4m3(min(float32(float32(amax / 6) / g), 448)) * g)`` per 16 and codes
    ``e2m1(float32(v / unit))`` (0 where the unit is 0)."""
    kp = fp4_kp(scheme, x.shape[1])
    rotated = fp4.padded_rotated(x, kp, scheme.rotation)
    if not scheme.activations:
        return rotated, np.zeros_like(rotated)
    m, group = rotated.shape[0], FP4_GROUP[scheme.family]
    blocks = f32(rotated).reshape(m, kp // group, group)
    amax = np.abs(blocks).max(-1)
    if scheme.family == "mxfp4":
        exponent = np.frexp(amax)[1] - 1 - 2  # amax = mant * 2**e with mant in [0.5, 1): floor(log2(amax)) = e - 1
        unit = np.exp2(np.where(amax > 0, np.clip(exponent, -127, 127), -127).astype(np.float64))
        scaled = blocks / unit[..., None]
    else:
        row_amax = amax.max(-1, keepdims=True)
        g = f32(row_amax / 2688.0)
        g = np.where(g > 0, g, 1.0)
        scale, _, _ = round_to_table(np.minimum(f32(f32(amax / 6.0) / g), 448.0), E4M3_TABLE)
        unit = f32(scale * g)
        scaled = np.where(unit[..., None] > 0, f32(blocks / np.where(unit > 0, unit, 1.0)[..., None]), 0.0)
    rounded, _, step = round_to_table(scaled, E2M1_TABLE)
    return (rounded * unit[..., None]).reshape(m, kp), (step * unit[..., None]).reshape(m, kp)


def bnb_fp4_levels() -> np.ndarray:
    """bitsandbytes FP4 (``functional.get_4bit_type("fp4")``), by code: bit 3 the sign, bits 1-2 an exponent ``e``,
    bit 0 a mantissa bit ``m``; magnitude ``2**(4 - e) * (1 + m / 2)`` (``e > 0``: 8, 12, 4, 6, 2, 3 for codes 2-7)
    or ``m / 16`` (``e = 0``: 0, 0.0625); the table is divided by its largest magnitude, 12, in float32."""
    codes = np.arange(16)
    e, m = (codes >> 1) & 3, codes & 1
    magnitude = np.where(e == 0, m / 16, np.exp2(4.0 - e) * (1 + m / 2))
    return np.where(codes & 8, -1.0, 1.0) * f32(magnitude / 12.0)


def table_weight(levels: np.ndarray, group: int, tensors, n: int, k: int, family: str) -> np.ndarray:
    """``w = levels[u] * absmax`` per group, ``u`` a nibble (element ``2j`` low, ``2j+1`` high)."""
    kp = ceil_to(k, group)
    if len(tensors) != 2:
        raise AssertionError(f"definitions: {family} has 2 packed tensors, got {len(tensors)}")
    codes = unpack_bits(array(tensors[0], "qweight", (n, kp // 2), torch.uint8), 4, kp)
    absmax = array(tensors[1], "scales", (n, kp // group), torch.float32).astype(np.float64)
    return levels[codes] * np.repeat(absmax, group, axis=1)


def fp8_weight(tensors, n: int, k: int) -> np.ndarray:
    """``w = e4m3(qweight) * scales[n]`` (one float32 scale per output channel)."""
    if len(tensors) != 2:
        raise AssertionError(f"definitions: fp8 has 2 packed tensors, got {len(tensors)}")
    codes = e4m3_decode(array(tensors[0], "qweight", (n, k), torch.float8_e4m3fn))
    return codes * array(tensors[1], "scales", (n, 1), torch.float32).astype(np.float64)


def fp8_block_weight(tensors, n: int, k: int) -> np.ndarray:
    """``w[n, k] = e4m3(qweight[n, k]) * scales[n // 128, k // 128]``."""
    if len(tensors) != 2:
        raise AssertionError(f"definitions: fp8-block has 2 packed tensors, got {len(tensors)}")
    codes = e4m3_decode(array(tensors[0], "qweight", (n, k), torch.float8_e4m3fn))
    scales = array(tensors[1], "scales", (-(-n // 128), -(-k // 128)), torch.float32).astype(np.float64)
    return codes * scales[np.arange(n) // 128][:, np.arange(k) // 128]


def gguf_type(qtype: str):
    """The peer's ggml type for a scheme name (``q4_k`` → ``GGMLQuantizationType.Q4_K``)."""
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[qtype.upper()]


def gguf_kp(qtype: str, k: int) -> int:
    """``K`` rounded up to the type's block size, as the peer ``gguf.constants.GGML_QUANT_SIZES`` gives it."""
    from gguf.constants import GGML_QUANT_SIZES

    return ceil_to(k, GGML_QUANT_SIZES[gguf_type(qtype)][0])


def gguf_weight(qtype: str, tensors, n: int, k: int) -> np.ndarray:
    """GGUF blocks decoded by the peer, ``gguf.quants.dequantize`` (gguf-py, written from ggml's ``dequantize_row_*``):
    one ``blocks uint8 [N, Kp / QK * BLOCK_BYTES]`` tensor, rows of whole blocks as in a GGUF file."""
    from gguf import quants
    from gguf.constants import GGML_QUANT_SIZES

    if len(tensors) != 1:
        raise AssertionError(f"definitions: gguf has 1 packed tensor, got {len(tensors)}")
    kp = gguf_kp(qtype, k)
    block, nbytes = GGML_QUANT_SIZES[gguf_type(qtype)]
    blocks = array(tensors[0], "blocks", (n, kp // block * nbytes), torch.uint8)
    return quants.dequantize(blocks, gguf_type(qtype)).astype(np.float64)


def unquantized(x: np.ndarray, kp: int) -> tuple[np.ndarray, np.ndarray]:
    """Weight-only schemes: the activation as it is, zero-padded to ``kp``; no rounding."""
    return pad(x, kp), np.zeros((x.shape[0], kp))


def int_kp(bits: int, group: int | None, k: int) -> int:
    """``K`` rounded up to whole groups, or per channel to a whole packing unit."""
    return ceil_to(k, group) if group else ceil_to(k, PACK_UNIT[bits])


# -- bitsandbytes: 4-bit blocks over the flattened weight (bnb4), LLM.int8 (llm-int8) ---------------------------------
def bnb_dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic code (``functional.create_dynamic_map(signed=True)``, from Dettmers 2016,
    "8-Bit Approximations for Parallelism in Deep Learning"): 0, 1 and, for ``i = 0 .. 6``, ``±10**(i - 6) * m`` for
    the ``2**i`` midpoints ``m`` of ``linspace(0.1, 1, 2**i + 1)``; ascending, float64 (bitsandbytes: float32)."""
    values = [0.0, 1.0]
    for i in range(7):
        bounds = np.linspace(0.1, 1.0, 2**i + 1)
        means = (bounds[:-1] + bounds[1:]) / 2
        values += [*(10.0 ** (i - 6) * means), *(-(10.0 ** (i - 6)) * means)]
    return np.sort(np.array(values))


def bnb4_weight(scheme, tensors, n: int, k: int) -> np.ndarray:
    """bitsandbytes ``Linear4bit`` state: element ``f = n K + k`` of the flattened weight is the high nibble of byte
    ``f // 2`` when ``f`` is even, the low one when odd; ``w = table[code] * absmax[f // B]``; with ``-dq`` the absmax
    is ``float32(float32(map[absmax_code] * nested_absmax[b // 256]) + nested_offset)``."""
    numel, block = n * k, scheme.blocksize
    blocks = -(-numel // block)
    expected = 4 if scheme.double_quant else 2
    if len(tensors) != expected:
        raise AssertionError(f"definitions: {scheme.name} has {expected} packed tensors, got {len(tensors)}")
    packed = array(tensors[0], "qweight", ((numel + 1) // 2,), torch.uint8).astype(np.int64)
    f = np.arange(numel)
    codes = np.where(f % 2 == 0, packed[f // 2] >> 4, packed[f // 2] & 15)
    levels = np.array(NF4_LEVELS) if scheme.quant_type == "nf4" else bnb_fp4_levels()
    if scheme.double_quant:
        coded = array(tensors[1], "absmax", (blocks,), torch.uint8)
        nested = array(tensors[2], "nested_absmax", (-(-blocks // 256),), torch.float32).astype(np.float64)
        offset = array(tensors[3], "nested_offset", (1,), torch.float32).astype(np.float64)[0]
        absmax = f32(f32(bnb_dynamic_map()[coded] * nested[np.arange(blocks) // 256]) + offset)
    else:
        absmax = array(tensors[1], "absmax", (blocks,), torch.float32).astype(np.float64)
    return (levels[codes] * absmax[f // block]).reshape(n, k)


def llm_int8_weight(tensors, n: int, k: int) -> np.ndarray:
    """``w = qweight * scales[n] / 127`` (LLM.int8, Dettmers et al. 2022, arXiv:2208.07339: row-wise absmax)."""
    if len(tensors) != 2:
        raise AssertionError(f"definitions: llm-int8 has 2 packed tensors, got {len(tensors)}")
    codes = array(tensors[0], "qweight", (n, k), torch.int8).astype(np.float64)
    return codes * array(tensors[1], "scales", (n,), torch.float32).astype(np.float64)[:, None] / 127


def llm_int8_tokens(threshold: float, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LLM.int8's mixed decomposition as bitsandbytes runs it: on ``xh = float16(x)``, outliers are ``|xh| >=
    threshold``; their columns keep ``x``; elsewhere ``xh`` per token: ``s = max|xh|`` over the non-outliers ``/ 127``,
    codes ``round_half_even(xh / s)``, values ``codes * s`` (0 in a row with no non-zero non-outlier)."""
    xh = x.astype(np.float16).astype(np.float64)
    outliers = np.abs(xh) >= threshold
    columns = outliers.any(0)
    kept = np.where(outliers, 0.0, xh)
    scale = np.abs(kept).max(1, keepdims=True) / 127
    scale = np.where(scale > 0, scale, 1.0)
    codes, step = round_int(kept / scale, 127)
    return np.where(columns, x, codes * scale), np.where(columns, 0.0, step * scale)


# -- HIGGS -----------------------------------------------------------------------------------------------------------
#: the stored grids, read as data: point ``i`` of ``grids["p<p>-b<b>"]["points"]`` is the value of code ``i``
HIGGS_GRIDS = pathlib.Path(__file__).resolve().parents[2] / "qcompile" / "data" / "higgs_grids.json"


def higgs_grid(p: int, b: int) -> np.ndarray:
    """float64 ``[2**(p*b), p]``: the grid of ``p``-element vectors at ``b`` bits per weight."""
    points = np.array(json.loads(HIGGS_GRIDS.read_text())["grids"][f"p{p}-b{b}"]["points"], dtype=np.float64)
    if points.shape != (2 ** (p * b), p):
        raise AssertionError(f"definitions: grid p{p}-b{b} is {points.shape}, expected {(2 ** (p * b), p)}")
    return points


def higgs_codes(packed: np.ndarray, code_bits: int, count: int) -> np.ndarray:
    """uint8 ``[N, count * code_bits / 8]`` → int64 codes ``[N, count]`` (``qcompile.schemes.higgs`` docstring: 2, 3
    and 4 bits as :func:`unpack_bits`; 6 bits: code ``4j+i`` in bits ``6i..6i+5`` of the little-endian 24-bit word of
    bytes ``3j..3j+2``; 8 bits: code ``j`` is byte ``j``)."""
    if code_bits == 8:
        return packed.astype(np.int64)
    if code_bits != 6:
        return unpack_bits(packed, code_bits, count)
    b = packed.astype(np.int64)
    words = b[:, 0::3] | (b[:, 1::3] << 8) | (b[:, 2::3] << 16)
    codes = np.zeros((b.shape[0], count), dtype=np.int64)
    for i in range(4):
        codes[:, i::4] = (words >> (6 * i)) & 63
    return codes


def aqlm_weight(scheme, tensors, n: int, k: int) -> np.ndarray:
    """AQLM (Egiazarian et al. 2024, arXiv:2401.06118; the aqlm package's ``utils._dequantize_weight`` and
    ``unpack_int_data``), ``[N, Kp]`` with ``Kp`` = K rounded up to the input group ``ig``: ``W[n, g*ig + j] =
    scales[n] * sum_m codebooks[m, codes[n, g, m] mod 2**B, 0, j]``; codes stored signed (int8 up to 8 bits, int16
    above), float16 codebooks and scales."""
    m, b, ig = scheme.num_codebooks, scheme.bits, scheme.group_size
    kp, e = ceil_to(k, ig), 2**b
    if len(tensors) != 3:
        raise AssertionError(f"definitions: aqlm has 3 packed tensors, got {len(tensors)}")
    codes = array(tensors[0], "codes", (n, kp // ig, m), torch.int8 if b <= 8 else torch.int16).astype(np.int64) % e
    books = array(tensors[1], "codebooks", (m, e, 1, ig), torch.float16).astype(np.float64)
    scales = array(tensors[2], "scales", (n, 1, 1, 1), torch.float16).astype(np.float64).reshape(n, 1)
    w = sum(books[i, codes[:, :, i], 0, :] for i in range(m))
    return w.reshape(n, kp) * scales


def vptq_weight(scheme, tensors, n: int, k: int) -> np.ndarray:
    """VPTQ (Liu et al. 2024, arXiv:2409.17066; the vptq package's ``ops/quant_gemm.py: dequant`` and
    ``utils/pack.py: unpack_index_tensor``, one group): vector row ``i`` (outputs ``i*v .. i*v+v-1``) holds per main
    column ``c`` a ``tb``-bit entry at bits ``c*tb ..`` of its little-endian uint32 bitstream, main index low (``bk``
    bits), residual index high; ``Q[i*v+u, o+c] = C[idx, u] + Cr[ridx, u]``, ``Q[i*v+u, j] = Co[oidx[i, j], u]`` for
    the ``o`` outlier columns; ``W[n, perm[j]] = Q[n, j] * scale[perm[j]] + bias[perm[j]]`` (float16 codebooks,
    scale, bias; uint16 ``perm`` and outlier indices)."""
    v, kc, kr, o = scheme.vector_len, scheme.centroids, scheme.res_centroids, scheme.outliers
    bk, br = kc.bit_length() - 1, (kr.bit_length() - 1 if kr else 0)
    tb, rows, gs = bk + br, -(-n // v), k - o
    if len(tensors) != 5 + (1 if kr else 0) + (2 if o else 0):
        raise AssertionError(f"definitions: {scheme.name}: {len(tensors)} packed tensors")
    it = iter(tensors)
    words = array(next(it), "indices", (rows, -(-gs * tb // 32)), torch.int32).astype(np.int64) & 0xFFFFFFFF
    books = array(next(it), "centroids", (kc, v), torch.float16).astype(np.float64)
    res = array(next(it), "res_centroids", (kr, v), torch.float16).astype(np.float64) if kr else None
    if o:
        oidx = array(next(it), "outlier_indices", (rows, o), torch.int16).astype(np.int64) & 0xFFFF
        obooks = array(next(it), "outlier_centroids", (kc, v), torch.float16).astype(np.float64)
    scale = array(next(it), "weight_scale", (k,), torch.float16).astype(np.float64)
    bias = array(next(it), "weight_bias", (k,), torch.float16).astype(np.float64)
    perm = array(next(it), "perm", (k,), torch.int16).astype(np.int64) & 0xFFFF
    q = np.zeros((rows * v, k))
    for c in range(gs):
        entry = np.zeros(rows, dtype=np.int64)
        for b in range(tb):
            p = c * tb + b
            entry |= ((words[:, p // 32] >> (p % 32)) & 1) << b
        vec = books[entry & (kc - 1)]
        if kr:
            vec = vec + res[(entry >> bk) & (kr - 1)]
        q[:, o + c] = vec.reshape(-1)
    for j in range(o):
        q[:, j] = obooks[oidx[:, j]].reshape(-1)
    w = np.zeros((n, k))
    w[:, perm] = q[:n]
    return w * scale + bias


def higgs_kp(scheme, k: int) -> int:
    """``K`` rounded up to whole Hadamard blocks."""
    return ceil_to(k, scheme.hadamard)


def higgs_weight(scheme, tensors, n: int, k: int) -> np.ndarray:
    """The weight the rotated activation meets, ``[N, Kp]``: ``Wr[n, p*v + c] = grid[code[n, v], c] * scales[n, (p*v +
    c) // g]`` with ``g = min(256, h)`` and float16 scales."""
    p, b, kp = scheme.dim, scheme.bits, higgs_kp(scheme, k)
    group = min(256, scheme.hadamard)
    if len(tensors) != 2:
        raise AssertionError(f"definitions: higgs has 2 packed tensors, got {len(tensors)}")
    codes = higgs_codes(array(tensors[0], "qweight", (n, kp * b // 8), torch.uint8), p * b, kp // p)
    scales = array(tensors[1], "scales", (n, kp // group), torch.float16).astype(np.float64)
    return higgs_grid(p, b)[codes].reshape(n, kp) * np.repeat(scales, group, axis=1)


def higgs_tokens(scheme, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x_p @ Hb`` (float64, the Sylvester Hadamard of block ``h`` built from bit parities: ``fp4.padded_rotated``);
    no rounding."""
    rotated = fp4.padded_rotated(x, higgs_kp(scheme, x.shape[1]), scheme.hadamard)
    return rotated, np.zeros_like(rotated)


# -- OCP MX 6- and 8-bit: E2M3 / E3M2 / E4M3 / E5M2 elements, E8M0 scales per 32 ------------------------------------
#: element type -> (bits, exponent bits, mantissa bits, exponent bias): OCP MX v1.0 section 5.3, OCP 8-bit FP v1.0
MX_ELEMENTS = {"e2m3": (6, 2, 3, 1), "e3m2": (6, 3, 2, 3), "e4m3": (8, 4, 3, 7), "e5m2": (8, 5, 2, 15)}


def mx_element_decode(codes: np.ndarray, element: str) -> np.ndarray:
    """float64 values of element codes: top bit the sign, then the exponent field ``E`` and the mantissa field ``m``;
    ``2**(E - bias) * (1 + m / 2**M)``, subnormal ``2**(1 - bias) * m / 2**M`` for ``E = 0``. E4M3: ``S.1111.111`` is
    NaN (no infinities); E5M2: ``E = 31`` is infinity (``m = 0``) or NaN; the 6-bit types have no special codes."""
    bits, ebits, mbits, bias = MX_ELEMENTS[element]
    c = np.asarray(codes).astype(np.int64)
    e, m = (c >> mbits) & ((1 << ebits) - 1), c & ((1 << mbits) - 1)
    magnitude = np.where(e == 0, m / 2.0**mbits * 2.0 ** (1 - bias), (1 + m / 2.0**mbits) * np.exp2(e - float(bias)))
    if element == "e4m3":
        magnitude = np.where((e == 15) & (m == 7), np.nan, magnitude)
    if element == "e5m2":
        magnitude = np.where(e == 31, np.where(m == 0, np.inf, np.nan), magnitude)
    return np.where((c >> (bits - 1)) & 1, -magnitude, magnitude)


def mx_element_table(element: str) -> np.ndarray:
    """The finite non-negative values of an element type, ascending, indexed by their codes."""
    values = mx_element_decode(np.arange(1 << (MX_ELEMENTS[element][0] - 1)), element)
    return values[np.isfinite(values)]


def mx_fp6_codes(packed: np.ndarray, kp: int) -> np.ndarray:
    """uint8 ``[N, Kp * 3 / 4]`` → int64 codes ``[N, Kp]``: element ``4j+i`` in bits ``6i..6i+5`` of the little-endian
    24-bit word of bytes ``3j..3j+2``."""
    b = packed.astype(np.int64)
    words = b[:, 0::3] | (b[:, 1::3] << 8) | (b[:, 2::3] << 16)
    codes = np.zeros((b.shape[0], kp), dtype=np.int64)
    for i in range(4):
        codes[:, i::4] = (words >> (6 * i)) & 63
    return codes


def mx_weight(scheme, tensors, n: int, k: int) -> np.ndarray:
    """``element(code) * 2**(s - 127)`` per group of 32 along K (``s = 255`` is NaN), ``K`` padded to 32; codes 4 in
    3 bytes (mxfp6) or one a byte (mxfp8: the float8 tensor's bits)."""
    kp, bits = ceil_to(k, 32), MX_ELEMENTS[scheme.element][0]
    if len(tensors) != 2:
        raise AssertionError(f"definitions: {scheme.family} has 2 packed tensors, got {len(tensors)}")
    if bits == 6:
        codes = mx_fp6_codes(array(tensors[0], "qweight", (n, kp * 3 // 4), torch.uint8), kp)
    else:
        dtype = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[scheme.element]
        codes = array(tensors[0], "qweight", (n, kp), dtype)
    s = array(tensors[1], "scales", (n, kp // 32), torch.uint8).astype(np.float64)
    unit = np.where(s == 255, np.nan, np.exp2(s - 127))
    return mx_element_decode(codes, scheme.element) * np.repeat(unit, 32, axis=1)


def mx_tokens(scheme, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zero-padded to whole groups of 32; with activations quantized, per token and group, of its float32 values:
    ``unit = 2**clamp(floor(log2(amax)) - emax, -127, 127)`` (``-127`` for ``amax = 0``; ``emax = floor(log2)`` of
    the type's largest value) and the element nearest ``v / unit`` (ties to even, saturating)."""
    kp = ceil_to(x.shape[1], 32)
    if not scheme.activations:
        return unquantized(x, kp)
    table = mx_element_table(scheme.element)
    emax = int(np.floor(np.log2(table[-1])))
    m = x.shape[0]
    blocks = f32(pad(x, kp)).reshape(m, kp // 32, 32)
    amax = np.abs(blocks).max(-1)
    exponent = np.frexp(amax)[1] - 1 - emax  # amax = mant * 2**e with mant in [0.5, 1): floor(log2(amax)) = e - 1
    unit = np.exp2(np.where(amax > 0, np.clip(exponent, -127, 127), -127).astype(np.float64))
    rounded, _, step = round_to_table(blocks / unit[..., None], table)
    return (rounded * unit[..., None]).reshape(m, kp), (step * unit[..., None]).reshape(m, kp)


# -- peer families (quanto, torchao, eetq): a peer's numbers in an int-weight-only or fp8 layout ---------------------
def round_to_peer(values, dtype: str) -> np.ndarray:
    """Round float64 ``values`` to the peer dtype (``bf16``: 8 significant bits; ``fp16``: IEEE half), half to even:
    the peer's offsets (``shift``, ``zero_point``) are stored as float32 zeros and come back rounded to it."""
    v = np.asarray(values, dtype=np.float64)
    if dtype == "fp16":
        return v.astype(np.float16).astype(np.float64)
    if dtype == "bf16":
        bits = v.astype(np.float32).view(np.uint32).astype(np.uint64)  # exact here: the input is a float32 product
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.astype(np.uint32).view(np.float32).astype(np.float64)
    return v


def peer_weight(scheme, tensors, n: int, k: int) -> np.ndarray:
    """quanto / torchao / eetq weights: 8 bits ``q * scale`` (int8 or e4m3 code); quanto 2/4 bits
    ``scale * u - shift`` with ``shift = dtype(float32(zeros * scale))``; torchao int4 ``(u - 8) * scale + zero_point``
    with ``zero_point = dtype(float32(float32(8 - zeros) * scale))``."""
    weights = getattr(scheme, "weights", "int8")
    expected = 3 if weights in ("int2", "int4") or (scheme.family == "quanto" and scheme.activations) else 2
    if len(tensors) != expected:
        raise AssertionError(f"definitions: {scheme.name} has {expected} packed tensors, got {len(tensors)}")
    if weights == "fp8":
        return fp8_weight(tensors[:2], n, k)
    if weights == "int8":
        return int_weight(8, None, True, tensors[:2], n, k)
    bits, group = int(weights[3:]), scheme.group_size
    kp = int_kp(bits, group, k)
    u = unpack_bits(array(tensors[0], "qweight", (n, kp * bits // 8), torch.uint8), bits, kp)
    groups = kp // (group or kp)
    scale = array(tensors[1], "scales", (n, groups), torch.float32).astype(np.float64)
    zeros = array(tensors[2], "zeros", (n, groups), torch.float32).astype(np.float64)
    if scheme.family == "quanto":
        offset = -round_to_peer(f32(zeros * scale), scheme.dtype)
    else:
        offset = round_to_peer(f32(f32(8.0 - zeros) * scale), scheme.dtype) - 8.0 * scale
    per_element = np.repeat(np.arange(groups), kp // groups)
    return u * scale[:, per_element] + offset[:, per_element]


def quanto_static_tokens(input_scale: float, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """quanto ``-a8``: ``x_q = clamp(round_half_even(x / s), -128, 127)`` with one float32 ``s``; values ``x_q * s``."""
    v = x / input_scale
    fraction = np.abs(v) - np.floor(np.abs(v))
    near_tie = (np.abs(fraction - 0.5) <= TIE * np.abs(v)) & (v > -128) & (v < 127)
    return np.clip(np.round(v), -128, 127) * input_scale, near_tie * input_scale


def torchao_int8_tokens(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """torchao ``int8-a8`` per token: ``s = max(float32(absmax / 127.5), 2**-23)``, ``x_q = clamp(round_half_even(x *
    float32(1 / s)), -128, 127)``; values ``x_q * s``."""
    scale = np.maximum(f32(np.abs(x).max(1, keepdims=True) / 127.5), 2.0**-23)
    v = x * f32(1.0 / scale)
    fraction = np.abs(v) - np.floor(np.abs(v))
    near_tie = (np.abs(fraction - 0.5) <= TIE * np.abs(v)) & (v > -128) & (v < 127)
    return np.clip(np.round(v), -128, 127) * scale, near_tie * scale


def peer_tokens(scheme, x: np.ndarray, tensors) -> tuple[np.ndarray, np.ndarray]:
    """The activation each peer scheme's weight meets: as it is (weight-only), quanto's static int8, torchao's
    per-token int8 or float8 (the ``fp8-w8a8`` rule: torchao's for float32 activations)."""
    if not getattr(scheme, "activations", False):
        weights = getattr(scheme, "weights", "int8")
        bits = int(weights[3:]) if weights in ("int2", "int4") else 8
        return unquantized(x, int_kp(bits, scheme.group_size, x.shape[1]) if bits < 8 else x.shape[1])
    if scheme.family == "quanto":
        return quanto_static_tokens(float(array(tensors[2], "input_scale", (1,), torch.float32)[0]), x)
    return torchao_int8_tokens(x) if scheme.weights == "int8" else e4m3_tokens(x)


# -- SpQR: spqr_quant 0.2.0 (inference.py, sparse_util.py, inference_kernels/spqr_cuda.cpp) ------------------------
def spqr_weight(scheme, tensors, n: int, k: int) -> np.ndarray:
    """``[N, Kp]`` (``Kp = ceil(K / 16) * 16``, input-feature order) as ``spqr_quant``'s ``dequantize_compressed`` and
    ``spqr_quantized_matvec`` read the packed words: 16 int64 words per 16 x 16 tile (tiles row-major, words in row
    order; its compressor writes 16 words also for a partial last tile row); the tile's second-order word is the OR of
    ``((word_r >> 54) & 0xff) << (8 * (r // 2))`` over its rows, read as four float16 ``ss.x, ss.y, zz.x, zz.y`` =
    scale-of-scale, scale-of-zero, zero-of-scale, zero-of-zero; ``s = ss.x * (ws - zz.x)``, ``z = ss.y * (wz - zz.y)``,
    ``w = s * (q - z)``, each operation a float16 one; ``ws, wz, q`` = 3-bit fields 0, 1, 2 + c of the word. CSR
    outliers (``merge_col_val``: float16 value in the high 16 bits, column in the low 16) are added in float; the
    matvec gathers ``x[in_perm[j]]`` (``in_perm`` = pairs of uint16, low half first), so the stored column ``j`` is
    input feature ``perm[j]``."""
    kp = ceil_to(k, 16)
    t, g = ceil_to(n, 16) // 16, kp // 16
    words = array(tensors[0], "dense_weights", (t * g * 16,), torch.int64).view(np.uint64).reshape(t, g, 16)
    offsets = array(tensors[1], "row_offsets", (n + 1,), torch.int32).astype(np.int64)
    if tensors[2].dtype != torch.int32 or tensors[2].dim() != 1:
        raise AssertionError(f"definitions: col_vals is {tensors[2].dtype}{list(tensors[2].shape)}, expected "
                             f"int32[nnz]")  # fmt: skip
    col_vals = tensors[2].numpy().view(np.uint32).astype(np.int64)
    in_perm = array(tensors[3], "in_perm", (kp // 2,), torch.int32).view(np.uint32).astype(np.int64)

    def f16(v):
        return np.asarray(v, dtype=np.float64).astype(np.float16).astype(np.float64)

    d = np.zeros((t * 16, kp))
    fields = np.arange(16, dtype=np.uint64)
    for ti in range(t):
        for tj in range(g):
            tile = words[ti, tj]
            second = 0
            for r in range(16):
                second |= ((int(tile[r]) >> 54) & 0xFF) << (8 * (r // 2))
            halves = np.array([(second >> (16 * i)) & 0xFFFF for i in range(4)], dtype=np.uint16).view(np.float16)
            ssx, ssy, zzx, zzy = (float(v) for v in halves)
            for r in range(16):
                word = int(tile[r])
                s = f16(ssx * f16((word & 7) - zzx))
                z = f16(ssy * f16(((word >> 3) & 7) - zzy))
                q = ((tile[r] >> (np.uint64(3) * (fields + np.uint64(2)))) & np.uint64(7)).astype(np.float64)
                d[ti * 16 + r, tj * 16 : tj * 16 + 16] = f16(s * f16(q - z))
    for r in range(n):
        for e in range(offsets[r], offsets[r + 1]):
            value = np.array([col_vals[e] >> 16], dtype=np.uint16).view(np.float16)[0]
            d[r, col_vals[e] & 0xFFFF] += float(value)
    perm = np.stack([in_perm & 0xFFFF, in_perm >> 16], axis=1).reshape(-1)
    w = np.zeros_like(d)
    w[:, perm] = d
    return w[:n]


# -- the families ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Definition:
    """``options``: the scheme dataclass fields the definition reads (besides ``version``); a scheme with any other
    field is not covered and the guard test says so."""

    options: tuple[str, ...]
    weight: Callable[..., np.ndarray]
    activations: Callable[..., tuple[np.ndarray, np.ndarray]]
    #: ``activations(scheme, x, tensors)``: the activation rule reads a packed tensor (a static input scale)
    reads_tensors: bool = False


DEFINITIONS: dict[str, Definition] = {
    "int-weight-only": Definition(
        ("bits", "group_size", "symmetric"),
        lambda s, t, n, k: int_weight(s.bits, s.group_size, s.symmetric, t, n, k),
        lambda s, x: unquantized(x, int_kp(s.bits, s.group_size, x.shape[1])),
    ),
    "w8a8-int8": Definition(
        (), lambda s, t, n, k: int_weight(8, None, True, t, n, k), lambda s, x: int8_tokens(x, x.shape[1]),
    ),
    "w4a8-int": Definition(
        ("group_size", "symmetric"),
        lambda s, t, n, k: int_weight(4, s.group_size, s.symmetric, t, n, k),
        lambda s, x: int8_tokens(x, int_kp(4, s.group_size, x.shape[1])),
    ),
    "nf4": Definition(
        ("group_size",),
        lambda s, t, n, k: table_weight(np.array(NF4_LEVELS), s.group_size, t, n, k, "nf4"),
        lambda s, x: unquantized(x, ceil_to(x.shape[1], s.group_size)),
    ),
    "bnb-fp4": Definition(
        ("group_size",),
        lambda s, t, n, k: table_weight(bnb_fp4_levels(), s.group_size, t, n, k, "bnb-fp4"),
        lambda s, x: unquantized(x, ceil_to(x.shape[1], s.group_size)),
    ),
    "fp8": Definition(
        ("activations",),
        lambda s, t, n, k: fp8_weight(t, n, k),
        lambda s, x: e4m3_tokens(x) if s.activations else unquantized(x, x.shape[1]),
    ),
    "fp8-block": Definition(
        ("ue8m0",), lambda s, t, n, k: fp8_block_weight(t, n, k), lambda s, x: fp8_block_tokens(x, s.ue8m0),
    ),
    "mxfp4": Definition(("activations", "rotation"), fp4_weight, fp4_tokens),
    "gguf": Definition(
        ("qtype",),
        lambda s, t, n, k: gguf_weight(s.qtype, t, n, k),
        lambda s, x: unquantized(x, gguf_kp(s.qtype, x.shape[1])),
    ),
    "nvfp4": Definition(("activations", "rotation"), fp4_weight, fp4_tokens),
    "bnb4": Definition(
        ("quant_type", "double_quant", "blocksize"), bnb4_weight, lambda s, x: unquantized(x, x.shape[1]),
    ),
    "llm-int8": Definition(
        ("threshold",), lambda s, t, n, k: llm_int8_weight(t, n, k), lambda s, x: llm_int8_tokens(s.threshold, x),
    ),
    "higgs": Definition(("bits", "dim", "hadamard"), higgs_weight, higgs_tokens),
    "mxfp6": Definition(("element", "activations"), mx_weight, mx_tokens),
    "mxfp8": Definition(("element", "activations"), mx_weight, mx_tokens),
    "quanto": Definition(("weights", "group_size", "activations", "dtype"), peer_weight, peer_tokens, True),
    "torchao": Definition(("weights", "group_size", "activations", "dtype"), peer_weight, peer_tokens, True),
    "eetq": Definition((), peer_weight, peer_tokens, True),
    "spqr": Definition((), spqr_weight, lambda s, x: unquantized(x, ceil_to(x.shape[1], 16))),
    "aqlm": Definition(("num_codebooks", "bits", "group_size"), aqlm_weight,
                       lambda s, x: unquantized(x, ceil_to(x.shape[1], s.group_size))),
    "vptq": Definition(("vector_len", "centroids", "res_centroids", "outliers"), vptq_weight,
                       lambda s, x: unquantized(x, x.shape[1])),
}


def linear(scheme, x: torch.Tensor, tensors, bias: torch.Tensor | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``(y [M, N], slack [M, N])``: ``y = A @ W.T + bias`` with ``A, step = activations(x)`` and ``W`` the
    decoded weight; ``slack = step @ |W|.T`` bounds what near-tie roundings of the activation may move ``y`` by."""
    definition = DEFINITIONS[scheme.family]
    x64 = x.detach().to(torch.float64).reshape(-1, x.shape[-1]).numpy()
    w = definition.weight(scheme, tensors, n, x64.shape[1])
    a, step = definition.activations(scheme, *((x64, tensors) if definition.reads_tensors else (x64,)))
    if a.shape[1] != w.shape[1]:
        raise AssertionError(f"definitions: {scheme.name}: activation width {a.shape[1]} != weight width {w.shape[1]}")
    y = a @ w.T
    if bias is not None:
        y = y + bias.detach().to(torch.float64).numpy()
    return y, step @ np.abs(w).T


def perturb(tensors: list[torch.Tensor], row: int = 1, k: int | None = None) -> list[torch.Tensor]:
    """The tensor list with bit 0 of byte 0 of ``tensors[0]`` (the codes) in ``row`` flipped: the lowest bit of element
    0's code for every layout (for an e4m3 code whose flip would give NaN, bit 1 instead). Codes of the flattened
    weight (a 1-D ``tensors[0]``, bnb4: element ``f`` in the high nibble of byte ``f // 2`` when ``f`` is even) need
    ``k``: the lowest bit of element ``row * k``'s code is flipped. SpQR's int64 words: code 0 of word ``row``."""
    codes = tensors[0].clone()
    if codes.dtype == torch.int64 and codes.dim() == 1:  # SpQR words: word r of tile (0, 0) is row r, code 0 bits 6-8
        codes[row] ^= 1 << 6
        return [codes, *tensors[1:]]
    raw = codes.view(torch.uint8)
    if raw.dim() == 1:
        if k is None:
            raise AssertionError("definitions.perturb: codes of a flattened weight need k (the row length)")
        first = row * k
        raw[first // 2] ^= 0x10 if first % 2 == 0 else 0x01
        return [codes, *tensors[1:]]
    flipped = int(raw[row, 0]) ^ 1
    if codes.dtype == torch.float8_e4m3fn and flipped & 0x7F == 0x7F:
        flipped ^= 3
    raw[row, 0] = flipped
    return [codes, *tensors[1:]]
