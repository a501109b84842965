"""MXFP4 (OCP Microscaling Formats v1.0): E2M1 elements, one E8M0 power-of-two scale per 32 along K.

``mxfp4``, ``mxfp4-had``, ``mxfp4-had64``, ``mxfp4-w4a4``, ``mxfp4-w4a4-had128`` … (options and the rotation:
:mod:`qcompile.schemes.fp4`; Hadamard sizes 32, 64, 128). Per group ``g`` of 32 elements of a row (of ``W_p @ Hb``
with a rotation)::

    e = clamp(floor(log2(amax)) - 2, -127, 127)      (2 = emax of E2M1; amax = 0 gives e = -127)
    scales[n, g] = e + 127                          (E8M0; 255 would be NaN and is never written)
    qweight codes = e2m1(w / 2**e)                  w = e2m1_value(code) * 2**(scales[n, g] - 127)

``floor(log2(amax))`` is read from the float32 ``amax``'s exponent (``frexp``), exact. Values up to ``8 * 2**e``
meet the grid, so the largest of a group may saturate at ``6 * 2**e`` (the spec's rule). With ``-w4a4`` each
activation row is quantized per group of 32 along K by the same rule at run time.

Peers (compared in the tests): gguf's MXFP4 has the same scale rule and decodes to the same values, but breaks
E2M1 ties towards the smaller magnitude (0.75 → 0.5) and lays each block out as ``[E8M0, 16 bytes]`` with element
``i`` and ``i + 16`` in one byte. compressed-tensors' MXFP4 observer rounds ``amax`` to a power of two first, so
where ``amax``'s mantissa is at least 1.75 its exponent is one higher than this rule's; elsewhere scales and
codes agree.

Packed tensors: ``qweight uint8 [N, Kp/2]`` (element ``2j`` in the low nibble), ``scales uint8 [N, Kp/32]``;
4.25 bits per weight. ``Kp`` = ``K`` rounded up to 32 (to ``max(32, h)`` with a rotation of size ``h``).
"""

from __future__ import annotations

import dataclasses

import torch

from qcompile.schemes.fp4 import FP4Scheme
from qcompile.schemes.registry import Family, register_family

E8M0_BIAS = 127
#: floor(log2(6)): the exponent of E2M1's largest value
E2M1_EMAX = 2


def e8m0_encode(amax: torch.Tensor) -> torch.Tensor:
    """``uint8`` E8M0 block scales from float32 block ``amax`` (the rule of the module docstring)."""
    _, exponent = torch.frexp(amax.to(torch.float32))  # amax = m * 2**exponent, 0.5 <= m < 1: floor(log2) = exponent-1
    shared = torch.clamp(exponent.to(torch.int32) - 1 - E2M1_EMAX, -E8M0_BIAS, E8M0_BIAS)
    shared = torch.where(amax > 0, shared, torch.full_like(shared, -E8M0_BIAS))
    return (shared + E8M0_BIAS).to(torch.uint8)


def e8m0_decode(scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``2 ** (s - 127)`` (NaN for 255) of ``uint8`` E8M0 ``scales``, in ``dtype`` (exact in float32: 2**-127 is a
    subnormal)."""
    values = torch.pow(2.0, scales.to(torch.float64) - E8M0_BIAS)
    return torch.where(scales == 255, torch.nan, values).to(dtype)


@dataclasses.dataclass(frozen=True)
class MXFP4(FP4Scheme):
    """E2M1 weights, an E8M0 scale per 32 along K; ``activations`` (``-w4a4``), ``rotation`` (``-had``)."""

    family = "mxfp4"
    group_size = 32
    rotation_sizes = (32, 64, 128)
    scale_dtype = torch.uint8
    scale_doc = "E8M0 exponent per group of 32 along K: 2**(s - 127)"

    def encode_scales(self, amax, global_scale):
        return e8m0_encode(amax)

    def scale_values(self, scales, global_scale):
        return e8m0_decode(scales)


register_family(Family(
    "mxfp4", MXFP4, examples=("mxfp4", "mxfp4-had", "mxfp4-w4a4-had"),
    kernels=("qcompile.codegen.cpp.mxfp4", "qcompile.codegen.triton.fp4"), onnx="qcompile.onnx.families.mxfp4:lower",
))  # fmt: skip
