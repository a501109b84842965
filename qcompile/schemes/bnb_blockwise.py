"""bitsandbytes' blockwise codecs over a flattened tensor, operation for operation as its CPU backend runs them, so
codes and absmax come out byte for byte (the family using them is :mod:`qcompile.schemes.bnb4`).

A tensor of ``n`` elements is read flat (row-major) and cut into blocks of ``B`` consecutive elements; the last
block holds ``n % B`` when that is not 0. Every operation below is float32, in this order.

**4-bit** (``quantize_4bit``; bitsandbytes' ``default`` kernel, the one CPU tensors run)::

    absmax[b] = max |v|   over block b                  (the last, partial block: clamped to >= 1e-38)
    s         = clamp(v * (1 / max(absmax[b], 1e-38)), -1, 1)      (the partial block divides: v / absmax)
    code      = the table entry ``s`` is nearest to: the number of midpoints of the sorted table below ``s``
                (a value on a midpoint takes the lower entry), mapped back to the table's code order

An odd ``n`` gets one padding code, the code of ``s = 0``. Tables: NF4 (:data:`~qcompile.schemes.nf4.NF4_LEVELS`)
is sorted; FP4 (:data:`~qcompile.schemes.bnb_fp4.BNB_FP4_LEVELS`) is not, and ``s = 0`` takes code 0 (+0, sorted
before code 8, -0).

**8-bit dynamic code** (``quantize_blockwise`` with its default code, :func:`dynamic_map`, blocks of 256): the 256
values of ``create_dynamic_map(signed=True)``: 0, 1 and, for ``i = 0 .. 6``, ``±10**(i - 6) * m`` for the ``2**i``
midpoints ``m`` of ``linspace(0.1, 1, 2**i + 1)`` (float32), sorted. bitsandbytes' CPU kernel does not search for
the nearest value: it reads a table of 65536 bins over ``[-1, 1]``::

    absmax[b] = max |v|                                 (a block with absmax 0 gets codes 0)
    t         = (clamp(v * (1 / absmax[b]), -1, 1) + 1) * 0.5
    code      = LUT[trunc(t * 65535 + 0.5)]             LUT[i] = #{midpoints of the map < -1 + 2 i / 65535}

so a value within 1/65535 of a midpoint may take the neighbouring code (its CUDA kernel searches exactly); both
decode the same way, ``map[code] * absmax[b]``.
"""

from __future__ import annotations

import functools

import torch

from qcompile.schemes.bnb_fp4 import BNB_FP4_LEVELS
from qcompile.schemes.nf4 import NF4_LEVELS

#: the 4-bit tables by bitsandbytes' quant_type name, float32 values by code
TABLES = {"nf4": NF4_LEVELS, "fp4": BNB_FP4_LEVELS}
#: bins of the CPU kernel's 8-bit lookup table over [-1, 1]
LUT_BINS = 65536


@functools.cache
def dynamic_map_values() -> tuple[float, ...]:
    """bitsandbytes' ``create_dynamic_map(signed=True)`` (8 bits, up to 7 exponent bits), as its 256 float32 values
    ascending, built from the definition in the module docstring with the same float32 operations."""
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (i - 6)
        data += (scale * means).tolist() + (-scale * means).tolist()
    data += [0.0, 1.0]
    return tuple(sorted(data))


def dynamic_map(device=None) -> torch.Tensor:
    """float32 ``[256]``: :func:`dynamic_map_values` (a fresh tensor on each call)."""
    return torch.tensor(dynamic_map_values(), dtype=torch.float32, device=device)


def table(quant_type: str, device=None) -> torch.Tensor:
    """float32 ``[16]``: the 4-bit table of ``quant_type`` (``nf4`` or ``fp4``), indexed by code."""
    return torch.tensor(TABLES[quant_type], dtype=torch.float32, device=device)


def _blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(full [n // B, B], rest [n % B])`` of a flat tensor."""
    full = flat.numel() - flat.numel() % blocksize
    return flat[:full].reshape(-1, blocksize), flat[full:]


def quantize_4bit(values: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' 4-bit blockwise quantization of ``values`` (any shape, read flat; upcast to float32): ``(codes
    uint8 [n + n % 2], absmax float32 [ceil(n / B)])``, the codes one per element (plus the padding code when ``n``
    is odd). See the module docstring."""
    flat = values.reshape(-1).to(torch.float32)
    full, rest = _blocks(flat, blocksize)
    absmax = full.abs().amax(-1) if full.numel() else full.new_zeros(0)
    scaled = torch.clamp(full * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).reshape(-1)
    if rest.numel():
        last = rest.abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last.reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(rest / last, -1, 1)])
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    levels = table(quant_type, values.device)
    order = torch.argsort(levels, stable=True)
    sorted_levels = levels[order]
    midpoints = (sorted_levels[:-1] + sorted_levels[1:]) / 2
    codes = order[torch.searchsorted(midpoints, scaled, right=False)]
    return codes.to(torch.uint8), absmax


@functools.cache
def _lookup_table() -> torch.Tensor:
    """int64 ``[65536]``: the CPU kernel's bin → code table for :func:`dynamic_map`."""
    code = dynamic_map()
    midpoints = (code[:-1] + code[1:]) * 0.5
    bins = torch.arange(LUT_BINS, dtype=torch.float32)
    centers = -1.0 + (2.0 * bins) / float(LUT_BINS - 1)
    return torch.searchsorted(midpoints, centers, right=False)


def quantize_dynamic_8bit(values: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU ``quantize_blockwise`` with the dynamic map: float32 ``values [n]`` → ``(codes uint8 [n],
    absmax float32 [ceil(n / B)])`` (see the module docstring)."""
    flat = values.reshape(-1).to(torch.float32)
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n)).reshape(blocks, blocksize)
    absmax = padded.abs().amax(-1)
    scaled = torch.clamp(padded * (1.0 / absmax).view(-1, 1), -1.0, 1.0)
    bins = ((scaled + 1.0) * 0.5 * float(LUT_BINS - 1) + 0.5).to(torch.int64)
    codes = _lookup_table().to(flat.device)[bins.clamp(0, LUT_BINS - 1)]
    codes = torch.where(absmax.view(-1, 1) == 0, 0, codes)
    return codes.reshape(-1)[:n].to(torch.uint8), absmax


def decode_dynamic_8bit(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = 256) -> torch.Tensor:
    """float32 ``[n]``: ``map[codes[i]] * absmax[i // B]`` (one float32 product)."""
    values = dynamic_map(codes.device)[codes.long()]
    return values * absmax.repeat_interleave(blocksize)[: codes.numel()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 ``[2m]`` codes → uint8 ``[m]``: element ``2i`` in the high nibble of byte ``i``, ``2i+1`` in the low."""
    return (codes[0::2] << 4) | codes[1::2]


def unpack_nibbles(packed: torch.Tensor, count: int) -> torch.Tensor:
    """uint8 ``[m]`` → uint8 ``[count]`` codes (``count <= 2m``), inverse of :func:`pack_nibbles`."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(-1)[:count]
