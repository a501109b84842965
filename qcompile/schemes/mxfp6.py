"""MXFP6 (OCP Microscaling Formats v1.0): 6-bit float elements (E3M2 or E2M3), one E8M0 scale per 32 along K.

``mxfp6-e3m2``, ``mxfp6-e2m3`` (weight-only) and ``mxfp6-e3m2-w6a6``, ``mxfp6-e2m3-w6a6`` (each activation row
quantized at run time to the same element type, per group of 32 along K). Element types, the scale rule, rounding
and packing: :mod:`qcompile.schemes.mx`. Per group ``g`` of 32 elements of a row::

    e = clamp(floor(log2(amax)) - emax, -127, 127)     (emax: 4 for E3M2, 2 for E2M3; amax = 0 gives -127)
    scales[n, g] = e + 127                            (E8M0)
    codes = element(w / 2**e)                         w = element_value(code) * 2**(scales[n, g] - 127)

Packed tensors: ``qweight uint8 [N, Kp * 3 / 4]`` (4 codes in 3 bytes: element ``4j + i`` in bits ``6i .. 6i + 5``
of the little-endian 24-bit word of bytes ``3j .. 3j + 2``; code bit 5 is the sign), ``scales uint8 [N, Kp / 32]``;
6.25 bits per weight. ``Kp`` = ``K`` rounded up to 32.

Peers (compared in the tests): compressed-tensors' MXFP6 is E2M3 with the same packing (``pack_fp6_to_uint8``); its
observer rounds ``amax`` up to a power of two first where its mantissa is at least 1.9375, so there its scale is one
higher than this rule's. torchao's ``to_mx`` (``ScaleCalculationMode.FLOOR``) follows the spec's rule: the same codes
and scales for both element types.
"""

from __future__ import annotations

import dataclasses

import torch

from qcompile.schemes.base import TensorSpec
from qcompile.schemes.mx import MXScheme, pack_fp6, unpack_fp6
from qcompile.schemes.registry import Family, register_family


@dataclasses.dataclass(frozen=True)
class MXFP6(MXScheme):
    """6-bit MX elements (``element`` ``"e3m2"`` or ``"e2m3"``), an E8M0 scale per 32 along K; ``activations``
    (``-w6a6``)."""

    family = "mxfp6"
    bits = 6
    elements = ("e3m2", "e2m3")

    def qweight_spec(self, out_features, k_padded):
        return TensorSpec("qweight", (out_features, k_padded * 3 // 4), torch.uint8,
                          f"{self.element} codes, 4 in 3 bytes: element 4j+i in bits 6i..6i+5 of the little-endian "
                          f"word of bytes 3j..3j+2")  # fmt: skip

    def pack_codes(self, codes):
        return pack_fp6(codes)

    def unpack_codes(self, qweight, k_padded):
        return unpack_fp6(qweight, k_padded)


register_family(Family(
    "mxfp6", MXFP6, examples=("mxfp6-e3m2", "mxfp6-e2m3", "mxfp6-e3m2-w6a6", "mxfp6-e2m3-w6a6"),
    kernels=("qcompile.codegen.cpp.mx", "qcompile.codegen.triton.mx"), onnx="qcompile.onnx.families.mx:lower",
))  # fmt: skip
