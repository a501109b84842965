"""NVFP4: E2M1 elements, one float8 e4m3 scale per 16 along K, and one float32 scale for the whole tensor.

``nvfp4``, ``nvfp4-had``, ``nvfp4-had64``, ``nvfp4-w4a4``, ``nvfp4-w4a4-had64`` … (options and the rotation:
:mod:`qcompile.schemes.fp4`; Hadamard sizes 16, 32, 64, 128). For an ``[N, K]`` weight (``W_p @ Hb`` with a
rotation), in float32 operations::

    global_scale = amax(W) / (448 * 6)                          (1 where that is 0)
    scales[n, g] = e4m3(min(amax(group) / 6 / global_scale, 448))   (round to nearest even; 448 = e4m3 max)
    unit = float(scales[n, g]) * global_scale
    qweight codes = e2m1(w / unit)                              (0 where the unit is 0)
    w = e2m1_value(code) * unit

``-w4a4`` quantizes each activation row by the same rule at run time, with a **per-token** global scale
``amax(x_row) / (448 * 6)`` (of the row after any rotation) in place of the tensor's.

compressed-tensors stores the reciprocal, ``weight_global_scale = 448 * 6 / amax``, and its block scale as
``e4m3(amax(group) / 6 * weight_global_scale)``; the effective unit there is ``weight_scale / weight_global_scale``.
So ``global_scale = 1 / weight_global_scale`` and ``scales = weight_scale``, up to float32 rounding of the
reciprocal (compared code for code in the tests).

Packed tensors: ``qweight uint8 [N, Kp/2]`` (element ``2j`` in the low nibble), ``scales float8_e4m3fn [N, Kp/16]``,
``global_scale float32 [1]``; 4.5 + 32/(N*K) bits per weight. ``Kp`` = ``K`` rounded up to 16 (to ``max(16, h)``
with a rotation of size ``h``).
"""

from __future__ import annotations

import dataclasses

import torch

from qcompile.schemes.base import TensorSpec
from qcompile.schemes.fp4 import E2M1_MAX, FP4Scheme
from qcompile.schemes.registry import Family, register_family

E4M3_MAX = 448.0
#: the largest value a block scale times an element can reach: amax is mapped onto it
GLOBAL_RANGE = E4M3_MAX * E2M1_MAX


@dataclasses.dataclass(frozen=True)
class NVFP4(FP4Scheme):
    """E2M1 weights, an e4m3 scale per 16 along K and a float32 tensor scale; ``activations`` (``-w4a4``),
    ``rotation`` (``-had``)."""

    family = "nvfp4"
    group_size = 16
    rotation_sizes = (16, 32, 64, 128)
    scale_dtype = torch.float8_e4m3fn
    scale_doc = "e4m3 scale per group of 16 along K (times global_scale)"

    def extra_tensors(self, out_features, in_features):
        return (TensorSpec("global_scale", (1,), torch.float32, "float32 tensor scale: amax(W) / (448 * 6)"),)

    def global_scales(self, amax_rows, per_row):
        scale = amax_rows.to(torch.float32) / GLOBAL_RANGE
        return torch.where(scale > 0, scale, torch.ones_like(scale))

    def encode_scales(self, amax, global_scale):
        block = amax.to(torch.float32) / E2M1_MAX / global_scale
        return torch.clamp(block, max=E4M3_MAX).to(torch.float8_e4m3fn)

    def scale_values(self, scales, global_scale):
        return scales.to(torch.float32) * global_scale.to(torch.float32).reshape(-1, 1)


register_family(Family(
    "nvfp4", NVFP4, examples=("nvfp4", "nvfp4-had", "nvfp4-w4a4-had"),
    kernels=("qcompile.codegen.cpp.nvfp4", "qcompile.codegen.triton.fp4"), onnx="qcompile.onnx.families.nvfp4:lower",
))  # fmt: skip
