"""ggml's quantized blocks: byte layouts, element order, decoding to fields and to float32, encoding back.

A row-major ``[N, K]`` ggml tensor of a block type is ``N`` rows of ``K / QK`` blocks of ``BLOCK_BYTES`` bytes each,
one after the other (block ``b`` of a row holds elements ``b*QK .. b*QK + QK - 1``). Everything is little-endian;
``f16`` is IEEE half. Below, one section per type gives the fields in byte order, the element order (which bits of
which byte make element ``e`` of the block, ``0 <= e < QK``) and the formula; ``sc``/``m`` are the sub-block scale
and min codes. Sources: llama.cpp ``ggml-common.h`` (block structs) and ``ggml-quants.c`` (``dequantize_row_*``).

The functions work on ``R`` blocks at once: ``decode(blocks uint8 [R, BLOCK_BYTES]) -> fields`` (a dict of tensors,
``q`` the per-element code ``[R, QK]`` in element order), ``encode(fields) -> blocks``, and ``values(fields) ->
float32 [R, QK]``, computed with ggml's float32 operations in ggml's order (``(d*sc)*q - dmin*m`` …) so that the
result equals ggml's and gguf-py's dequantization bit for bit. :func:`dequantize` chains ``decode`` and ``values``.

Q4_0 (id 2, QK 32, 18 bytes) ``d f16 | qs u8[16]``
    element ``j < 16``: low nibble of ``qs[j]``; element ``j + 16``: high nibble.      ``w = d * (q - 8)``
Q4_1 (id 3, QK 32, 20 bytes) ``d f16 | m f16 | qs u8[16]``
    nibbles as Q4_0.                                                                   ``w = d * q + m``
Q5_0 (id 6, QK 32, 22 bytes) ``d f16 | qh u8[4] | qs u8[16]``
    low 4 bits as Q4_0; bit 4 of element ``e`` is bit ``e`` of ``qh`` read as a little-endian u32.  ``w = d*(q-16)``
Q5_1 (id 7, QK 32, 24 bytes) ``d f16 | m f16 | qh u8[4] | qs u8[16]``
    bits as Q5_0.                                                                      ``w = d * q + m``
Q8_0 (id 8, QK 32, 34 bytes) ``d f16 | qs i8[32]``
    element ``e`` is ``qs[e]`` (signed).                                               ``w = q * d``
Q2_K (id 10, QK 256, 84 bytes) ``scales u8[16] | qs u8[64] | d f16 | dmin f16``
    element ``128h + 32s + l`` (``h < 2, s < 4, l < 32``) is bits ``2s .. 2s+1`` of ``qs[32h + l]``;
    sub-block ``j = e // 16`` has ``sc = scales[j] & 15``, ``m = scales[j] >> 4``.   ``w = (d*sc) * q - dmin*m``
Q3_K (id 11, QK 256, 110 bytes) ``hmask u8[32] | qs u8[64] | scales u8[12] | d f16``
    low 2 bits as Q2_K; high bit of element ``32b + l`` is bit ``b`` of ``hmask[l]``; the 6-bit scale of sub-block
    ``j = e // 16`` has low 4 bits ``scales[j] & 15`` (``j < 8``) or ``scales[j-8] >> 4``, high 2 bits
    ``(scales[8 + j%4] >> 2(j//4)) & 3``. Here ``q = low | high << 2`` in 0..7.    ``w = (d*(sc-32)) * (q-4)``
Q4_K (id 12, QK 256, 144 bytes) ``d f16 | dmin f16 | scales u8[12] | qs u8[128]``
    element ``64c + 32n + l`` is nibble ``n`` (0 low) of ``qs[32c + l]``; sub-block ``j = e // 32`` has 6-bit
    ``sc, m``: ``j < 4``: ``scales[j] & 63, scales[j+4] & 63``; ``j >= 4``: ``(scales[j+4] & 15) | (scales[j-4] >> 6)
    << 4``, ``(scales[j+4] >> 4) | (scales[j] >> 6) << 4``.                     ``w = (d*sc) * q - dmin*m``
Q5_K (id 13, QK 256, 176 bytes) ``d f16 | dmin f16 | scales u8[12] | qh u8[32] | qs u8[128]``
    low 4 bits and scales as Q4_K; bit 4 of element ``32b + l`` is bit ``b`` of ``qh[l]``.  formula as Q4_K
Q6_K (id 14, QK 256, 210 bytes) ``ql u8[128] | qh u8[64] | scales i8[16] | d f16``
    element ``128h + 32s + l``: low 4 bits from ``ql[64h + 32(s%2) + l]`` (low nibble for ``s < 2``, high
    otherwise), high 2 bits ``(qh[32h + l] >> 2s) & 3``; ``sc = scales[e // 16]``.  ``w = (d*sc) * (q - 32)``
IQ4_NL (id 20, QK 32, 18 bytes) ``d f16 | qs u8[16]``
    nibbles as Q4_0, an index into ``KVALUES``.                                        ``w = d * KVALUES[q]``
IQ4_XS (id 23, QK 256, 136 bytes) ``d f16 | scales_h u16 | scales_l u8[4] | qs u8[128]``
    sub-block ``j = e // 32``: element ``32j + l`` (``l < 16``) the low nibble of ``qs[16j + l]``, ``32j + 16 + l``
    the high one; ``ls = ((scales_l[j//2] >> 4(j%2)) & 15) | ((scales_h >> 2j) & 3) << 4``.
                                                                                 ``w = (d*(ls-32)) * KVALUES[q]``
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

QK_K = 256
#: the IQ4_NL / IQ4_XS levels (llama.cpp ``kvalues_iq4nl``)
KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

Fields = dict  # str -> torch.Tensor, leading dimension R (blocks)


@dataclasses.dataclass(frozen=True)
class BlockType:
    """One ggml block type: ``name`` (lower case), ggml ``type_id``, elements per block ``qk``, ``nbytes`` per block,
    ``layout`` (field name and byte count, in byte order), the code range ``lo .. hi`` of ``fields["q"]``, and the
    three functions of the module docstring."""

    name: str
    type_id: int
    qk: int
    nbytes: int
    layout: tuple[tuple[str, int], ...]
    lo: int
    hi: int
    decode: Callable[[torch.Tensor], Fields]
    encode: Callable[[Fields], torch.Tensor]
    values: Callable[[Fields], torch.Tensor]


# -- byte helpers -----------------------------------------------------------------------------------------------------
def _split(blocks: torch.Tensor, layout) -> dict[str, torch.Tensor]:
    out, at = {}, 0
    for name, size in layout:
        out[name] = blocks[:, at : at + size]
        at += size
    return out


def _join(parts: dict[str, torch.Tensor], layout) -> torch.Tensor:
    return torch.cat([parts[name].to(torch.uint8).reshape(parts[name].shape[0], size) for name, size in layout], 1)


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """``uint8 [R, 2]`` → ``float16 [R]`` (little-endian)."""
    return raw.contiguous().view(torch.float16).reshape(-1)


def _f16_bytes(value: torch.Tensor) -> torch.Tensor:
    return value.to(torch.float16).reshape(-1, 1).contiguous().view(torch.uint8)


def _col(value: torch.Tensor) -> torch.Tensor:
    return value.to(torch.float32).reshape(-1, 1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """``[R, G, 16]`` bytes → ``[R, G, 32]`` codes: low nibbles then high nibbles."""
    return torch.cat([qs & 15, qs >> 4], -1)


def _from_nibbles(q: torch.Tensor) -> torch.Tensor:
    half = q.shape[-1] // 2
    return (q[..., :half] & 15) | ((q[..., half:] & 15) << 4)


def _bit_planes(raw: torch.Tensor, planes: int) -> torch.Tensor:
    """``[R, 32]`` bytes → ``[R, planes * 32]``: element ``32b + l`` is bit ``b`` of ``raw[l]``."""
    shifts = torch.arange(planes, dtype=torch.int32).reshape(1, planes, 1)
    return ((raw.to(torch.int32).unsqueeze(1) >> shifts) & 1).reshape(raw.shape[0], -1)


def _to_bit_planes(bits: torch.Tensor, planes: int) -> torch.Tensor:
    shifts = torch.arange(planes, dtype=torch.int32).reshape(1, planes, 1)
    return (bits.to(torch.int32).reshape(bits.shape[0], planes, 32) << shifts).sum(1)


def _crumbs(qs: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K low bits: ``[R, 64]`` → ``[R, 256]``, element ``128h + 32s + l`` = bits ``2s`` of ``qs[32h + l]``."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32).reshape(1, 1, 4, 1)
    return ((qs.to(torch.int32).reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, QK_K)


def _from_crumbs(low: torch.Tensor) -> torch.Tensor:
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32).reshape(1, 1, 4, 1)
    return ((low.to(torch.int32) & 3).reshape(-1, 2, 4, 32) << shifts).sum(2).reshape(-1, 64)


def k4_scales(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: ``scales u8 [R, 12]`` → 6-bit ``(sc, m)``, each ``int32 [R, 8]`` (``get_scale_min_k4``)."""
    s = raw.to(torch.int32)
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], 1)
    m = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], 1)
    return sc, m


def k4_scale_bytes(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    sc, m = sc.to(torch.int32) & 63, m.to(torch.int32) & 63
    first = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    second = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    third = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    return torch.cat([first, second, third], 1).to(torch.uint8)


def q3_scales(raw: torch.Tensor) -> torch.Tensor:
    """Q3_K: ``scales u8 [R, 12]`` → 6-bit codes ``int32 [R, 16]`` (the scale is ``code - 32``)."""
    s = raw.to(torch.int32)
    low = torch.cat([s[:, 0:8] & 15, s[:, 0:8] >> 4], 1)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32).reshape(1, 4, 1)
    high = ((s[:, 8:12].unsqueeze(1) >> shifts) & 3).reshape(-1, 16)  # j = 4 * (j // 4) + j % 4
    return low | (high << 4)


def q3_scale_bytes(codes: torch.Tensor) -> torch.Tensor:
    c = codes.to(torch.int32) & 63
    low = (c[:, 0:8] & 15) | ((c[:, 8:16] & 15) << 4)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32).reshape(1, 4, 1)
    high = (((c >> 4) & 3).reshape(-1, 4, 4) << shifts).sum(1)
    return torch.cat([low, high], 1).to(torch.uint8)


def iq4xs_scales(scales_h: torch.Tensor, scales_l: torch.Tensor) -> torch.Tensor:
    """IQ4_XS: ``scales_h u8 [R, 2]`` (a u16), ``scales_l u8 [R, 4]`` → 6-bit ``ls`` ``int32 [R, 8]``."""
    h = scales_h.to(torch.int32)
    h = h[:, 0] | (h[:, 1] << 8)
    low = torch.stack([scales_l.to(torch.int32) & 15, scales_l.to(torch.int32) >> 4], -1).reshape(-1, 8)
    high = (h.unsqueeze(1) >> (2 * torch.arange(8, dtype=torch.int32))) & 3
    return low | (high << 4)


def iq4xs_scale_bytes(ls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ls = ls.to(torch.int32) & 63
    low = (ls[:, 0::2] & 15) | ((ls[:, 1::2] & 15) << 4)
    h = ((ls >> 4) << (2 * torch.arange(8, dtype=torch.int32))).sum(1)
    return torch.stack([h & 255, h >> 8], 1).to(torch.uint8), low.to(torch.uint8)


def _kvalues(device=None) -> torch.Tensor:
    return torch.tensor(KVALUES, dtype=torch.float32, device=device)


# -- the legacy 32-element types --------------------------------------------------------------------------------------
def _decode_q4_0(blocks, with_min=False, five=False, layout=None):
    p = _split(blocks, layout)
    q = _nibbles(p["qs"].to(torch.int32))
    if five:
        qh = p["qh"].to(torch.int32)
        word = qh[:, 0] | (qh[:, 1] << 8) | (qh[:, 2] << 16) | (qh[:, 3] << 24)
        q = q | (((word.unsqueeze(1) >> torch.arange(32, dtype=torch.int32)) & 1) << 4)
    fields = {"d": _f16(p["d"]), "q": q.to(torch.uint8)}
    if with_min:
        fields["m"] = _f16(p["m"])
    return fields


def _encode_q4_0(fields, layout=None):
    q = fields["q"].to(torch.int32)
    parts = {"d": _f16_bytes(fields["d"]), "qs": _from_nibbles(q)}
    if "m" in dict(layout):
        parts["m"] = _f16_bytes(fields["m"])
    if "qh" in dict(layout):
        word = (((q >> 4) & 1).to(torch.int64) << torch.arange(32, dtype=torch.int64)).sum(1)
        parts["qh"] = torch.stack([(word >> (8 * i)) & 255 for i in range(4)], 1)
    return _join(parts, layout)


def _legacy(name, type_id, layout, offset, with_min, five):
    nbytes = sum(size for _, size in layout)
    hi = 31 if five else 15

    def decode(blocks):
        return _decode_q4_0(blocks, with_min, five, layout)

    def encode(fields):
        return _encode_q4_0(fields, layout)

    if with_min:
        def values(fields):
            return _col(fields["d"]) * fields["q"].to(torch.float32) + _col(fields["m"])
    else:
        def values(fields):
            return _col(fields["d"]) * (fields["q"].to(torch.int32) - offset).to(torch.float32)

    return BlockType(name, type_id, 32, nbytes, layout, 0, hi, decode, encode, values)


def _decode_q8_0(blocks):
    p = _split(blocks, Q8_0_LAYOUT)
    return {"d": _f16(p["d"]), "q": p["qs"].contiguous().view(torch.int8)}


def _encode_q8_0(fields):
    return _join({"d": _f16_bytes(fields["d"]), "qs": fields["q"].to(torch.int8).view(torch.uint8)}, Q8_0_LAYOUT)


def _values_q8_0(fields):
    return fields["q"].to(torch.float32) * _col(fields["d"])


Q8_0_LAYOUT = (("d", 2), ("qs", 32))


# -- k-quants ---------------------------------------------------------------------------------------------------------
Q2_K_LAYOUT = (("scales", 16), ("qs", 64), ("d", 2), ("dmin", 2))
Q3_K_LAYOUT = (("hmask", 32), ("qs", 64), ("scales", 12), ("d", 2))
Q4_K_LAYOUT = (("d", 2), ("dmin", 2), ("scales", 12), ("qs", 128))
Q5_K_LAYOUT = (("d", 2), ("dmin", 2), ("scales", 12), ("qh", 32), ("qs", 128))
Q6_K_LAYOUT = (("ql", 128), ("qh", 64), ("scales", 16), ("d", 2))
IQ4_XS_LAYOUT = (("d", 2), ("scales_h", 2), ("scales_l", 4), ("qs", 128))


def _decode_q2_k(blocks):
    p = _split(blocks, Q2_K_LAYOUT)
    s = p["scales"].to(torch.int32)
    return {"d": _f16(p["d"]), "dmin": _f16(p["dmin"]), "sc": (s & 15).to(torch.uint8), "m": (s >> 4).to(torch.uint8),
            "q": _crumbs(p["qs"]).to(torch.uint8)}  # fmt: skip


def _encode_q2_k(f):
    scales = (f["sc"].to(torch.int32) & 15) | ((f["m"].to(torch.int32) & 15) << 4)
    return _join({"scales": scales, "qs": _from_crumbs(f["q"]), "d": _f16_bytes(f["d"]),
                  "dmin": _f16_bytes(f["dmin"])}, Q2_K_LAYOUT)  # fmt: skip


def _per(values: torch.Tensor, size: int) -> torch.Tensor:
    """``[R, S]`` per-sub-block values → ``[R, S * size]`` per element."""
    return values.repeat_interleave(size, dim=1)


def _values_q2_k(f):
    dl = _col(f["d"]) * f["sc"].to(torch.float32)
    ml = _col(f["dmin"]) * f["m"].to(torch.float32)
    return _per(dl, 16) * f["q"].to(torch.float32) - _per(ml, 16)


def _decode_q3_k(blocks):
    p = _split(blocks, Q3_K_LAYOUT)
    q = _crumbs(p["qs"]) | (_bit_planes(p["hmask"], 8) << 2)
    return {"d": _f16(p["d"]), "sc": q3_scales(p["scales"]).to(torch.uint8), "q": q.to(torch.uint8)}


def _encode_q3_k(f):
    q = f["q"].to(torch.int32)
    return _join({"hmask": _to_bit_planes((q >> 2) & 1, 8), "qs": _from_crumbs(q), "scales": q3_scale_bytes(f["sc"]),
                  "d": _f16_bytes(f["d"])}, Q3_K_LAYOUT)  # fmt: skip


def _values_q3_k(f):
    dl = _col(f["d"]) * (f["sc"].to(torch.int32) - 32).to(torch.float32)
    return _per(dl, 16) * (f["q"].to(torch.int32) - 4).to(torch.float32)


def _k4_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """``[R, 128]`` → ``[R, 256]``: element ``64c + 32n + l`` is nibble ``n`` of ``qs[32c + l]``."""
    qs = qs.to(torch.int32).reshape(-1, 4, 1, 32)
    return torch.cat([qs & 15, qs >> 4], 2).reshape(-1, QK_K)


def _from_k4_nibbles(q: torch.Tensor) -> torch.Tensor:
    q = q.to(torch.int32).reshape(-1, 4, 2, 32) & 15
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _decode_q4_k(blocks, five=False):
    p = _split(blocks, Q5_K_LAYOUT if five else Q4_K_LAYOUT)
    sc, m = k4_scales(p["scales"])
    q = _k4_nibbles(p["qs"])
    if five:
        q = q | (_bit_planes(p["qh"], 8) << 4)
    return {"d": _f16(p["d"]), "dmin": _f16(p["dmin"]), "sc": sc.to(torch.uint8), "m": m.to(torch.uint8),
            "q": q.to(torch.uint8)}  # fmt: skip


def _encode_q4_k(f, five=False):
    q = f["q"].to(torch.int32)
    parts = {"d": _f16_bytes(f["d"]), "dmin": _f16_bytes(f["dmin"]), "scales": k4_scale_bytes(f["sc"], f["m"]),
             "qs": _from_k4_nibbles(q)}  # fmt: skip
    if five:
        parts["qh"] = _to_bit_planes((q >> 4) & 1, 8)
    return _join(parts, Q5_K_LAYOUT if five else Q4_K_LAYOUT)


def _values_q4_k(f):
    d = _col(f["d"]) * f["sc"].to(torch.float32)
    dm = _col(f["dmin"]) * f["m"].to(torch.float32)
    return _per(d, 32) * f["q"].to(torch.float32) - _per(dm, 32)


def _decode_q6_k(blocks):
    p = _split(blocks, Q6_K_LAYOUT)
    ql = p["ql"].to(torch.int32).reshape(-1, 2, 1, 2, 32)
    low = torch.cat([ql & 15, ql >> 4], 2).reshape(-1, 2, 4, 32)  # s = 2 * nibble + half
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32).reshape(1, 1, 4, 1)
    high = (p["qh"].to(torch.int32).reshape(-1, 2, 1, 32) >> shifts) & 3
    q = (low | (high << 4)).reshape(-1, QK_K)
    return {"d": _f16(p["d"]), "sc": p["scales"].contiguous().view(torch.int8), "q": q.to(torch.uint8)}


def _encode_q6_k(f):
    q = f["q"].to(torch.int32).reshape(-1, 2, 4, 32)
    low = (q & 15).reshape(-1, 2, 2, 2, 32)  # [R, h, nibble, half, l]
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32).reshape(1, 1, 4, 1)
    qh = (((q >> 4) & 3) << shifts).sum(2).reshape(-1, 64)
    return _join({"ql": ql, "qh": qh, "scales": f["sc"].to(torch.int8).view(torch.uint8), "d": _f16_bytes(f["d"])},
                 Q6_K_LAYOUT)  # fmt: skip


def _values_q6_k(f):
    d = _col(f["d"]) * f["sc"].to(torch.float32)
    return _per(d, 16) * (f["q"].to(torch.int32) - 32).to(torch.float32)


# -- non-linear -------------------------------------------------------------------------------------------------------
IQ4_NL_LAYOUT = (("d", 2), ("qs", 16))


def _decode_iq4_nl(blocks):
    p = _split(blocks, IQ4_NL_LAYOUT)
    return {"d": _f16(p["d"]), "q": _nibbles(p["qs"].to(torch.int32)).to(torch.uint8)}


def _encode_iq4_nl(f):
    return _join({"d": _f16_bytes(f["d"]), "qs": _from_nibbles(f["q"].to(torch.int32))}, IQ4_NL_LAYOUT)


def _values_iq4_nl(f):
    return _col(f["d"]) * _kvalues(f["q"].device)[f["q"].long()]


def _decode_iq4_xs(blocks):
    p = _split(blocks, IQ4_XS_LAYOUT)
    q = _nibbles(p["qs"].to(torch.int32).reshape(-1, 8, 16)).reshape(-1, QK_K)
    return {"d": _f16(p["d"]), "sc": iq4xs_scales(p["scales_h"], p["scales_l"]).to(torch.uint8),
            "q": q.to(torch.uint8)}  # fmt: skip


def _encode_iq4_xs(f):
    scales_h, scales_l = iq4xs_scale_bytes(f["sc"])
    qs = _from_nibbles(f["q"].to(torch.int32).reshape(-1, 8, 32)).reshape(-1, 128)
    return _join({"d": _f16_bytes(f["d"]), "scales_h": scales_h, "scales_l": scales_l, "qs": qs}, IQ4_XS_LAYOUT)


def _values_iq4_xs(f):
    dl = _col(f["d"]) * (f["sc"].to(torch.int32) - 32).to(torch.float32)
    return _per(dl, 32) * _kvalues(f["q"].device)[f["q"].long()]


# -- the table --------------------------------------------------------------------------------------------------------
def _k(name, type_id, layout, lo, hi, decode, encode, values):
    return BlockType(name, type_id, QK_K, sum(s for _, s in layout), layout, lo, hi, decode, encode, values)


BLOCK_TYPES: dict[str, BlockType] = {
    t.name: t
    for t in (
        _legacy("q4_0", 2, (("d", 2), ("qs", 16)), 8, False, False),
        _legacy("q4_1", 3, (("d", 2), ("m", 2), ("qs", 16)), 0, True, False),
        _legacy("q5_0", 6, (("d", 2), ("qh", 4), ("qs", 16)), 16, False, True),
        _legacy("q5_1", 7, (("d", 2), ("m", 2), ("qh", 4), ("qs", 16)), 0, True, True),
        BlockType("q8_0", 8, 32, 34, Q8_0_LAYOUT, -128, 127, _decode_q8_0, _encode_q8_0, _values_q8_0),
        _k("q2_k", 10, Q2_K_LAYOUT, 0, 3, _decode_q2_k, _encode_q2_k, _values_q2_k),
        _k("q3_k", 11, Q3_K_LAYOUT, 0, 7, _decode_q3_k, _encode_q3_k, _values_q3_k),
        _k("q4_k", 12, Q4_K_LAYOUT, 0, 15, _decode_q4_k, _encode_q4_k, _values_q4_k),
        _k("q5_k", 13, Q5_K_LAYOUT, 0, 31, lambda b: _decode_q4_k(b, True), lambda f: _encode_q4_k(f, True),
           _values_q4_k),
        _k("q6_k", 14, Q6_K_LAYOUT, 0, 63, _decode_q6_k, _encode_q6_k, _values_q6_k),
        BlockType("iq4_nl", 20, 32, 18, IQ4_NL_LAYOUT, 0, 15, _decode_iq4_nl, _encode_iq4_nl, _values_iq4_nl),
        _k("iq4_xs", 23, IQ4_XS_LAYOUT, 0, 15, _decode_iq4_xs, _encode_iq4_xs, _values_iq4_xs),
    )
}  # fmt: skip
BY_TYPE_ID: dict[int, BlockType] = {t.type_id: t for t in BLOCK_TYPES.values()}


def block_type(name: str) -> BlockType:
    try:
        return BLOCK_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown ggml block type {name!r}; known: {', '.join(BLOCK_TYPES)}") from None


def as_blocks(data: torch.Tensor, kind: BlockType) -> torch.Tensor:
    """``uint8 [..., n * nbytes]`` → ``[R, nbytes]`` (a view when contiguous)."""
    if data.dtype != torch.uint8 or data.shape[-1] % kind.nbytes:
        raise ValueError(f"{kind.name}: expected uint8 rows of whole {kind.nbytes}-byte blocks, got "
                         f"{str(data.dtype).removeprefix('torch.')}{list(data.shape)}")  # fmt: skip
    return data.reshape(-1, kind.nbytes)


def dequantize(data: torch.Tensor, kind: BlockType | str) -> torch.Tensor:
    """``uint8 [N, nb * nbytes]`` blocks → ``float32 [N, nb * QK]`` in ggml's element order."""
    kind = block_type(kind) if isinstance(kind, str) else kind
    rows = data.shape[0] if data.dim() > 1 else 1
    return kind.values(kind.decode(as_blocks(data, kind))).reshape(rows, -1)
