"""W8A8 int8: int8 weights per output channel, int8 activations quantized per token at run time.

Weights are stored exactly as symmetric ``int8`` (see :mod:`qcompile.schemes.integer`):
``qweight int8 [N, K]``, ``scales float32 [N, 1]``, no zeros; 8 + 32/K bits per weight.

At run time each row (token) of the activation gets its own scale::

    x_scale[m] = absmax(x[m, :]) / 127        x_q = clamp(round(x / x_scale), -127, 127)
    y[m, n]    = (sum_k x_q[m, k] * q[n, k]) * x_scale[m] * scales[n] + bias[n]

The integer dot product is exact (int32 accumulation), as VNNI / IMMA kernels compute it.
"""

from __future__ import annotations

import dataclasses

import torch

from qcompile.schemes.base import Scheme
from qcompile.schemes.integer import IntWeightOnly, QuantizedActivations
from qcompile.schemes.registry import Family, register_family

_WEIGHTS = IntWeightOnly(bits=8, group_size=None, symmetric=True)
_ALIASES = {"w8a8": True, "w8a8-int8": True}


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` float → ``(int8 [M, K], float32 [M, 1])`` symmetric per-row quantization."""
    x = x.to(torch.float32)
    scale = x.abs().amax(-1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(x / scale), -127, 127).to(torch.int8), scale


def int8_matmul_exact(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``a [M, K] int8 @ b_t [N, K].T`` with exact int32 accumulation, returned as float32."""
    if a.device.type == "cpu":
        return torch._int_mm(a, b_t.t()).to(torch.float32)
    return (a.to(torch.float64) @ b_t.to(torch.float64).t()).to(torch.float32)


@dataclasses.dataclass(frozen=True)
class W8A8Int(QuantizedActivations, Scheme):
    """int8 weights (per channel) × int8 activations (dynamic, per token)."""

    version: int = 1
    family = "w8a8-int8"

    @property
    def weights(self) -> IntWeightOnly:
        return _WEIGHTS

    @property
    def name(self) -> str:
        return "w8a8"

    @classmethod
    def from_name(cls, name: str):
        return cls() if name in _ALIASES else None

    def reference_linear(self, x, packed, bias, out_features):
        qweight, scales = packed
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        x_q, x_scale = quantize_per_token_int8(x2)
        acc = int8_matmul_exact(x_q, qweight)
        y = acc * x_scale * scales.reshape(1, -1)
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y.to(x.dtype).reshape(*lead, -1)


register_family(Family(
    "w8a8-int8", W8A8Int, examples=("w8a8",), algorithms=("gptq", "awq", "hqq", "smoothquant", "autoround"),
    kernels=("qcompile.codegen.cpp.integer", "qcompile.codegen.triton.paths"), onnx="qcompile.onnx.families.w8a8:lower",
))  # fmt: skip
