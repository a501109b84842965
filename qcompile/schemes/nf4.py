"""NF4 (4-bit NormalFloat, as in QLoRA / bitsandbytes): ``nf4-g64``, ``nf4-g128`` …

Each group of ``group_size`` weights along K has one ``absmax`` scale; each weight is the index of
the nearest of 16 fixed levels (quantiles of a standard normal, scaled to [-1, 1])::

    w = NF4_LEVELS[u] * scales                  scales = absmax(group)

Packed tensors: ``qweight uint8 [N, K_padded / 2]`` (element ``2j`` in the low nibble, ``2j+1`` in the
high nibble, as for ``int4``), ``scales float32 [N, K_padded / group_size]``, no zeros;
4 + 32/group_size bits per weight. The last group is zero-padded like the integer schemes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import torch

from qcompile.schemes.base import PackedWeight, QuantizedWeight, Scheme, TensorSpec, ceil_to, pad_columns
from qcompile.schemes.packing import pack_codes, packed_row_bytes, unpack_codes
from qcompile.schemes.registry import Family, register_family

NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LevelTable(Scheme):
    """4-bit codes indexing a fixed table of 16 levels, scaled by a float32 absmax per group along K. Subclasses name
    the table (:attr:`levels`), the name prefix and the family (NF4 here, bitsandbytes' FP4 in ``bnb_fp4.py``)."""

    group_size: int = 64
    version: int = 1
    levels: ClassVar[tuple[float, ...]] = ()
    prefix: ClassVar[str] = ""

    def __post_init__(self):
        if self.group_size < 8 or self.group_size % 8:
            raise ValueError(f"group_size must be a multiple of 8 (>= 8), got {self.group_size}")

    @property
    def name(self):
        return f"{self.prefix}-g{self.group_size}"

    @classmethod
    def from_name(cls, name):
        m = re.match(rf"^{re.escape(cls.prefix)}-g(?P<group>\d+)$", name)
        return cls(group_size=int(m["group"])) if m else None

    def padded_in_features(self, in_features):
        return ceil_to(in_features, self.group_size)

    def group_size_for(self, in_features):
        return self.group_size

    def tensors(self, out_features, in_features):
        kp = self.padded_in_features(in_features)
        return (TensorSpec("qweight", (out_features, packed_row_bytes(4, kp)), torch.uint8,
                           "level indices, element 2j in the low nibble, 2j+1 in the high one"),
                TensorSpec("scales", (out_features, kp // self.group_size), torch.float32, "absmax per group"))

    def _levels(self, device) -> torch.Tensor:
        return torch.tensor(self.levels, dtype=torch.float32, device=device)

    def quantize(self, weight):
        """Nearest level of ``w / absmax`` (a tie goes to the lower code)."""
        n, k = weight.shape
        kp = self.padded_in_features(k)
        groups = pad_columns(weight.to(torch.float32), kp).reshape(n, kp // self.group_size, self.group_size)
        scales = groups.abs().amax(-1)
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        normalized = groups / scales.unsqueeze(-1)
        codes = (normalized.unsqueeze(-1) - self._levels(weight.device)).abs().argmin(-1).to(torch.uint8)
        return QuantizedWeight(codes.reshape(n, kp), scales, None, k)

    def dequantize(self, q):
        n, kp = q.codes.shape
        values = self._levels(q.codes.device)[q.codes.long()].reshape(n, -1, self.group_size) * q.scales.unsqueeze(-1)
        return values.reshape(n, kp)[:, : q.in_features]

    def pack(self, q):
        packed = PackedWeight({"qweight": pack_codes(q.codes, 4), "scales": q.scales})
        return self.checked_pack(packed, q.out_features, q.in_features)

    def unpack(self, packed: PackedWeight, in_features):
        codes = unpack_codes(packed["qweight"], 4, self.padded_in_features(in_features))
        return QuantizedWeight(codes, packed["scales"], None, in_features)


@dataclasses.dataclass(frozen=True)
class NF4(LevelTable):
    """4-bit NormalFloat weights with a float absmax per group."""

    levels: ClassVar[tuple[float, ...]] = NF4_LEVELS
    prefix: ClassVar[str] = "nf4"
    family = "nf4"


register_family(Family("nf4", NF4, examples=("nf4-g64",), algorithms=("awq", "smoothquant"),
                       onnx="qcompile.onnx.families.nf4:lower"))  # fmt: skip
