"""MXFP8 (OCP Microscaling Formats v1.0): 8-bit float elements (E4M3 or E5M2), one E8M0 scale per 32 along K.

``mxfp8-e4m3``, ``mxfp8-e5m2`` (weight-only) and ``mxfp8-e4m3-w8a8``, ``mxfp8-e5m2-w8a8`` (each activation row
quantized at run time to the same element type, per group of 32 along K). Element types, the scale rule and
rounding: :mod:`qcompile.schemes.mx`. Per group ``g`` of 32 elements of a row::

    e = clamp(floor(log2(amax)) - emax, -127, 127)     (emax: 8 for E4M3, 15 for E5M2; amax = 0 gives -127)
    scales[n, g] = e + 127                            (E8M0)
    codes = element(w / 2**e)                         w = element_value(code) * 2**(scales[n, g] - 127)

Packed tensors: ``qweight [N, Kp]`` one code a byte, stored in torch's float8 dtype of the element type
(``float8_e4m3fn`` / ``float8_e5m2``: the same bits, OCP's E4M3 and E5M2), ``scales uint8 [N, Kp / 32]``; 8.25 bits
per weight. ``Kp`` = ``K`` rounded up to 32. Codes saturate: never NaN, never infinity.

Peers (compared in the tests): compressed-tensors' MXFP8 is E4M3 stored the same way; its observer rounds ``amax``
up to a power of two first where its mantissa is at least 1.75, so there its scale is one higher than this rule's.
torchao's ``to_mx`` (``ScaleCalculationMode.FLOOR``) follows the spec's rule: the same codes and scales.
"""

from __future__ import annotations

import dataclasses

import torch

from qcompile.schemes.base import TensorSpec
from qcompile.schemes.mx import MXScheme
from qcompile.schemes.registry import Family, register_family

#: the torch dtype that holds each element type's bits
QWEIGHT_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


@dataclasses.dataclass(frozen=True)
class MXFP8(MXScheme):
    """8-bit MX elements (``element`` ``"e4m3"`` or ``"e5m2"``), an E8M0 scale per 32 along K; ``activations``
    (``-w8a8``)."""

    family = "mxfp8"
    bits = 8
    elements = ("e4m3", "e5m2")

    def qweight_spec(self, out_features, k_padded):
        dtype = QWEIGHT_DTYPES[self.element]
        return TensorSpec("qweight", (out_features, k_padded), dtype, f"{self.element} codes, one a byte")

    def pack_codes(self, codes):
        return codes.contiguous().view(QWEIGHT_DTYPES[self.element])

    def unpack_codes(self, qweight, k_padded):
        return qweight.contiguous().view(torch.uint8)


register_family(Family(
    "mxfp8", MXFP8, examples=("mxfp8-e4m3", "mxfp8-e5m2", "mxfp8-e4m3-w8a8", "mxfp8-e5m2-w8a8"),
    kernels=("qcompile.codegen.cpp.mx", "qcompile.codegen.triton.mx"), onnx="qcompile.onnx.families.mx:lower",
))  # fmt: skip
