"""EETQ's int8 weight-only format (W8A16, per output channel, float16 scales): scheme ``eetq-int8``.

EETQ quantizes float16 weights with FasterTransformer's ``symmetric_quantize`` (``csrc/cutlass_kernels/
cutlass_preprocessors.cc``, ``quant_weights(weight.t(), torch.int8, False)``), per output channel ``n``, in float32::

    scale[n] = absmax(W[n, :]) * (1 / 128)                        (exact: a power of two)
    q[n, k]  = clamp(round(W[n, k] / scale[n]), -128, 127)        round: half away from zero (C ``round``)
    stored:    q (int8), float16(scale[n])

and its GEMM dequantizes in float16: ``w = q * float16(scale)``. So it is *not* qcompile's ``int8``
(float32 ``absmax / 127``, round half to even, codes in [-127, 127]): the largest weight of a row maps to 128 and is
clipped to 127, and ties round away from zero. The float16 scale is exact (a float16 absmax divided by 128) while
it stays a normal float16, i.e. for rows with ``absmax >= 2**-7``; a smaller row's scale is a float16 subnormal,
rounded after the codes were computed with the float32 one.

Packed tensors: those of ``int8`` (``qweight int8 [N, K]``, ``scales float32 [N, 1]``, holding ``float16(scale)``
exactly), so ``int8``'s kernels serve it. The weight is dequantized in the activation's dtype as
``float32(q) * scale`` rounded once (for float16 activations: EETQ's ``q * scale`` in float16).
"""

from __future__ import annotations

import dataclasses

import torch

from qcompile.schemes import peers
from qcompile.schemes.base import QuantizedWeight
from qcompile.schemes.integer import IntWeightOnly
from qcompile.schemes.registry import Family, register_family

QUANT_RANGE_SCALE = 1.0 / 128  # 1 / (1 << (bits - 1)), bits = 8


def round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C's ``round`` of float32 values: to nearest, ties away from zero (exact in float64)."""
    v64 = v.to(torch.float64)
    return (torch.sign(v64) * torch.floor(v64.abs() + 0.5)).to(v.dtype)


@dataclasses.dataclass(frozen=True)
class EETQ(peers.PeerScheme):
    """EETQ int8 per-channel weights with float16 scales (a float16 model)."""

    version: int = 1

    family = "eetq"
    dtype = "fp16"

    @property
    def name(self) -> str:
        return "eetq-int8"

    @classmethod
    def from_name(cls, name):
        return cls() if name == "eetq-int8" else None

    @property
    def layout(self):
        return IntWeightOnly(bits=8, group_size=None, symmetric=True)

    def quantize(self, weight):
        if weight.dim() != 2:
            raise ValueError(f"{self.name}: expected a 2-D [N, K] weight, got shape {list(weight.shape)}")
        w = weight.to(torch.float16).to(torch.float32)
        scale = w.abs().amax(1, keepdim=True) * QUANT_RANGE_SCALE
        codes = torch.clamp(round_half_away(w / scale), -128, 127)
        codes = torch.nan_to_num(codes, nan=0.0).to(torch.int8)  # 0 / 0 rows: weight 0 whatever the code
        scales = scale.to(torch.float16).to(torch.float32)
        return QuantizedWeight(codes.contiguous(), scales.contiguous(), None, weight.shape[1])

    def dequantize_as(self, q, dtype):
        return peers.rowwise_as(q, dtype)


register_family(Family(
    "eetq", EETQ, examples=("eetq-int8",),
    kernels=("qcompile.codegen.cpp.peers", "qcompile.codegen.triton.peers"),
    onnx="qcompile.onnx.families.peers:lower",
))  # fmt: skip
