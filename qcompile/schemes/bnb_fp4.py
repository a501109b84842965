"""bitsandbytes' 4-bit float (its ``fp4`` quant type): ``bnb-fp4-g64``, ``bnb-fp4-g128`` …

Laid out as :mod:`qcompile.schemes.nf4` (its :class:`LevelTable`), with another table: 16 levels scaled by one ``absmax`` per group of
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
from typing import ClassVar

from qcompile.schemes.nf4 import LevelTable
from qcompile.schemes.registry import Family, register_family

#: float32 values of bitsandbytes' FP4 table, by code (exact decimal forms of the float32 numbers)
BNB_FP4_LEVELS = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
    -0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class BnbFP4(LevelTable):
    """bitsandbytes FP4 codes with a float32 absmax per group along K."""

    levels: ClassVar[tuple[float, ...]] = BNB_FP4_LEVELS
    prefix: ClassVar[str] = "bnb-fp4"
    family = "bnb-fp4"


register_family(Family("bnb-fp4", BnbFP4, examples=("bnb-fp4-g64",)))
