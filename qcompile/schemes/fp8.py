"""FP8 (float8 e4m3) schemes: weight-only ``fp8`` and ``fp8-w8a8`` (dynamic per-row activations).

Per output channel::

    scales[n] = absmax(W[n, :]) / 448          qweight[n, k] = e4m3(W[n, k] / scales[n])
    w = float(qweight) * scales

``fp8-w8a8`` also quantizes each activation row at run time (FBGEMM "rowwise" FP8)::

    x_scale[m] = absmax(x[m, :]) / 448          x_q = e4m3(x / x_scale)
    y[m, n] = (sum_k float(x_q[m, k]) * float(qweight[n, k])) * x_scale[m] * scales[n] + bias[n]

Packed tensors: ``qweight float8_e4m3fn [N, K]``, ``scales float32 [N, 1]``, no zeros;
8 + 32/K bits per weight. 448 is the largest finite e4m3 value.
"""

from __future__ import annotations

import dataclasses

import torch

from qcompile.schemes.base import PackedWeight, QuantizedWeight, Scheme, TensorSpec
from qcompile.schemes.registry import Family, register_family

E4M3_MAX = 448.0
_NAMES = {"fp8": False, "fp8-row": False, "fp8-w8a8": True}


def quantize_rowwise_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` → ``(float8_e4m3fn [M, K], float32 [M, 1])``."""
    x = x.to(torch.float32)
    scale = x.abs().amax(-1, keepdim=True) / E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(x / scale, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


@dataclasses.dataclass(frozen=True)
class FP8(Scheme):
    """float8 e4m3 weights per channel; ``activations=True`` makes it W8A8-FP8."""

    activations: bool = False
    version: int = 1
    family = "fp8"

    @property
    def quantizes_activations(self) -> bool:  # type: ignore[override]
        return self.activations

    @property
    def name(self) -> str:
        return "fp8-w8a8" if self.activations else "fp8"

    @classmethod
    def from_name(cls, name):
        return cls(activations=_NAMES[name]) if name in _NAMES else None

    def padded_in_features(self, in_features):
        return in_features

    def tensors(self, out_features, in_features):
        return (TensorSpec("qweight", (out_features, in_features), torch.float8_e4m3fn, "e4m3 codes"),
                TensorSpec("scales", (out_features, 1), torch.float32, "one scale per output channel"))

    def quantize(self, weight):
        codes, scales = quantize_rowwise_fp8(weight)
        return QuantizedWeight(codes.contiguous(), scales.contiguous(), None, weight.shape[1])

    def dequantize(self, q):
        return q.codes.to(torch.float32) * q.scales

    def pack(self, q):
        return self.checked_pack(PackedWeight({"qweight": q.codes, "scales": q.scales}), q.out_features,
                                 q.in_features)

    def unpack(self, packed: PackedWeight, in_features):
        return QuantizedWeight(packed["qweight"], packed["scales"], None, in_features)

    def reference_linear(self, x, packed, bias, out_features):
        if not self.activations:
            return super().reference_linear(x, packed, bias, out_features)
        qweight, scales = packed
        lead = x.shape[:-1]
        x_q, x_scale = quantize_rowwise_fp8(x.reshape(-1, x.shape[-1]))
        acc = x_q.to(torch.float32) @ qweight.to(torch.float32).t()
        y = acc * x_scale * scales.reshape(1, -1)
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y.to(x.dtype).reshape(*lead, -1)


register_family(Family(
    "fp8", FP8, examples=("fp8", "fp8-w8a8"), algorithms=("awq", "smoothquant"),
    kernels=("qcompile.codegen.triton.paths",), onnx="qcompile.onnx.families.fp8:lower",
))  # fmt: skip
