"""bitsandbytes' 4-bit float (its ``fp4`` quant type): ``bnb-fp4-g64``, ``bnb-fp4-g128`` …

Laid out as :mod:`qcompile.schemes.nf4`, with another table: 16 levels scaled by one ``absmax`` per group of
``group_size`` along K::

    w = BNB_FP4_LEVELS[u] * scales                  scales = absmax(group)

The table is bitsandbytes' own (``bitsandbytes.functional.get_4bit_type("fp4")``): 1 sign bit (bit 3), then two
exponent bits and one mantissa bit with bias 2 and a subnormal ``0b001``, giving the magnitudes ``0, 0.0625, 8, 12,
4, 6, 2, 3`` for codes 0-7, divided by 12 in float32 so the largest is 1. Codes 8-15 are the negatives (code 8 is
-0). These are not the E2M1 values of ``mxfp4``/``nvfp4``: the levels and their code order differ, so the codes of
a bitsandbytes FP4 checkpoint keep their meaning only under this table.

Packed tensors: ``qweight uint8 [N, K_padded / 2]`` (element ``2j`` in the low nibble, ``2j+1`` in the high one),
``scales float32 [N, K_padded / group_size]``; 4 + 32/group_size bits per weight. The last group is zero-padded.

Reference only: the family has no kernel rows (every call runs :meth:`Scheme.reference_linear`, in ``x.dtype``)
and no ONNX lowering. It exists so bitsandbytes FP4 checkpoints load with their codes unchanged.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from qcompile.schemes.base import PackedWeight, QuantizedWeight, Scheme, TensorSpec, ceil_to, pad_columns
from qcompile.schemes.packing import pack_codes, packed_row_bytes, unpack_codes
from qcompile.schemes.registry import Family, register_family

#: float32 values of bitsandbytes' FP4 table, by code (exact decimal forms of the float32 numbers)
BNB_FP4_LEVELS = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
    -0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
)  # fmt: skip
_NAME = re.compile(r"^bnb-fp4-g(?P<group>\d+)$")


@dataclasses.dataclass(frozen=True)
class BnbFP4(Scheme):
    """bitsandbytes FP4 codes with a float32 absmax per group along K."""

    group_size: int = 64
    version: int = 1
    family = "bnb-fp4"

    def __post_init__(self):
        if self.group_size < 8 or self.group_size % 8:
            raise ValueError(f"group_size must be a multiple of 8 (>= 8), got {self.group_size}")

    @property
    def name(self):
        return f"bnb-fp4-g{self.group_size}"

    @classmethod
    def from_name(cls, name):
        m = _NAME.match(name)
        return cls(group_size=int(m["group"])) if m else None

    def padded_in_features(self, in_features):
        return ceil_to(in_features, self.group_size)

    def group_size_for(self, in_features):
        return self.group_size

    def tensors(self, out_features, in_features):
        kp = self.padded_in_features(in_features)
        return (TensorSpec("qweight", (out_features, packed_row_bytes(4, kp)), torch.uint8,
                           "FP4 table indices, element 2j in the low nibble, 2j+1 in the high one"),
                TensorSpec("scales", (out_features, kp // self.group_size), torch.float32, "absmax per group"))

    def _levels(self, device) -> torch.Tensor:
        return torch.tensor(BNB_FP4_LEVELS, dtype=torch.float32, device=device)

    def quantize(self, weight):
        """Nearest table entry of ``w / absmax`` (ties to the lower code)."""
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


register_family(Family("bnb-fp4", BnbFP4, examples=("bnb-fp4-g64",)))
