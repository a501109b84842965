"""Bit packing of unsigned integer codes along the last dimension.

Canonical packed layouts (the form tests compare and the `.qpt` artifact names as layout ``"canonical"``):

| bits | elements per unit | unit   | element order                                                        |
|------|-------------------|--------|----------------------------------------------------------------------|
| 8    | 1                 | 1 byte | one signed int8 per byte (not handled here: stored as ``torch.int8``) |
| 4    | 2                 | 1 byte | element ``2j`` in bits 0-3 (low nibble), element ``2j+1`` in bits 4-7  |
| 2    | 4                 | 1 byte | element ``4j+i`` in bits ``2i .. 2i+1``                               |
| 3    | 8                 | 3 bytes| element ``8j+i`` in bits ``3i .. 3i+2`` of word ``j`` (bytes ``3j..3j+2``, LE) |

The packed row length is ``K_padded * bits / 8`` bytes; ``K_padded`` must be a multiple of the
elements per unit (callers pad first).
"""

from __future__ import annotations

import torch

ELEMENTS_PER_UNIT = {2: 4, 3: 8, 4: 2}
BYTES_PER_UNIT = {2: 1, 3: 3, 4: 1}


def packed_row_bytes(bits: int, k_padded: int) -> int:
    """Bytes one packed row of ``k_padded`` codes takes."""
    per_unit = ELEMENTS_PER_UNIT[bits]
    if k_padded % per_unit:
        raise ValueError(f"{bits}-bit packing needs K to be a multiple of {per_unit}, got {k_padded}")
    return k_padded // per_unit * BYTES_PER_UNIT[bits]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[..., K]`` (values in ``[0, 2**bits)``) into ``uint8 [..., K*bits/8]``."""
    if codes.dtype.is_floating_point:
        raise TypeError("pack_codes takes integer codes")
    k = codes.shape[-1]
    row_bytes = packed_row_bytes(bits, k)
    per_unit = ELEMENTS_PER_UNIT[bits]
    units = codes.to(torch.int32).reshape(*codes.shape[:-1], k // per_unit, per_unit)
    shifts = torch.arange(per_unit, dtype=torch.int32, device=codes.device) * bits
    words = (units << shifts).sum(-1)  # one int32 word per unit; bits never overlap
    if bits == 3:
        parts = [(words >> (8 * b)) & 0xFF for b in range(3)]
        packed = torch.stack(parts, dim=-1).reshape(*codes.shape[:-1], row_bytes)
    else:
        packed = words
    packed = packed.to(torch.uint8)
    assert packed.shape[-1] == row_bytes
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, k_padded: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``uint8 [..., K*bits/8]`` → ``uint8 [..., k_padded]`` codes."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed {bits}-bit codes must be uint8, got {packed.dtype}")
    row_bytes = packed_row_bytes(bits, k_padded)
    if packed.shape[-1] != row_bytes:
        raise ValueError(f"packed row has {packed.shape[-1]} bytes, expected {row_bytes} for K={k_padded}")
    per_unit = ELEMENTS_PER_UNIT[bits]
    lead = packed.shape[:-1]
    if bits == 3:
        b = packed.to(torch.int32).reshape(*lead, row_bytes // 3, 3)
        words = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    else:
        words = packed.to(torch.int32)
    shifts = torch.arange(per_unit, dtype=torch.int32, device=packed.device) * bits
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*lead, k_padded).to(torch.uint8)
