"""W4A8: group-wise int4 weights × int8 activations quantized per token at run time (``w4a8-g128``).

The weights are exactly those of ``int4-gN`` (asymmetric by default, ``-sym`` for symmetric): same codes,
same packed tensors (see :mod:`qcompile.schemes.integer`), so every calibration algorithm that writes int4
grids writes these too. What changes is the activation: each token is quantized to int8 as in ``w8a8``
(``x_scale = absmax / 127``, ``x_q = clamp(round(x / x_scale), -127, 127)``), and per group ``g``

    y[m, n] = x_scale[m] * sum_g scale[n, g] * (sum_{k in g} u[n, k] * x_q[m, k] - zero[n, g] * sum_{k in g} x_q[m, k])

with exact integer inner sums. On CPUs without wide float throughput this is the fast 4-bit path (llama.cpp
computes its Q4 × Q8 dot products the same way): the inner loop multiplies bytes instead of converting every
weight to float. The cost is the activation rounding, as in ``w8a8``.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from qcompile.schemes.base import PackedWeight, Scheme
from qcompile.schemes.integer import IntWeightOnly, QuantizedActivations
from qcompile.schemes.registry import Family, register_family
from qcompile.schemes.w8a8 import quantize_per_token_int8

_NAME = re.compile(r"^w4a8(?:-g(?P<group>\d+))?(?:-(?P<sym>sym|asym))?$")


@dataclasses.dataclass(frozen=True)
class W4A8Int(QuantizedActivations, Scheme):
    """int4 weights per group (or channel) × int8 activations per token, dynamic."""

    group_size: int | None = 128
    symmetric: bool = False
    version: int = 1

    family = "w4a8-int"
    bits = 4

    def __post_init__(self):
        self.weights  # validates the group size

    @property
    def weights(self) -> IntWeightOnly:
        """The int4 weight scheme whose codes and packed tensors this scheme uses."""
        return IntWeightOnly(bits=4, group_size=self.group_size, symmetric=self.symmetric)

    @property
    def name(self) -> str:
        out = "w4a8"
        if self.group_size is not None:
            out += f"-g{self.group_size}"
        return out + ("-sym" if self.symmetric else "")

    @classmethod
    def from_name(cls, name: str):
        m = _NAME.match(name)
        if not m:
            return None
        return cls(group_size=int(m["group"]) if m["group"] else None, symmetric=m["sym"] == "sym")

    def reference_linear(self, x, packed, bias, out_features):
        """The formula of the module docstring in float64 (integer sums are exact there), cast to ``x.dtype``."""
        k = x.shape[-1]
        lead = x.shape[:-1]
        kp, group = self.padded_in_features(k), self.group_size_for(k)
        named = PackedWeight.from_list(self, packed, out_features, k)
        scales, zeros = named["scales"], named.get("zeros")
        x_q, x_scale = quantize_per_token_int8(x.reshape(-1, k))
        m, n, g = x_q.shape[0], scales.shape[0], kp // group
        xq = torch.nn.functional.pad(x_q.to(torch.float64), (0, kp - k)).reshape(m, g, group)
        u = self.unpack(named, k).codes.to(torch.float64).reshape(n, g, group)
        zero = zeros.double() if zeros is not None else torch.full_like(scales, 8.0, dtype=torch.float64)
        dots = torch.einsum("mgk,ngk->mng", xq, u) - zero.unsqueeze(0) * xq.sum(-1).unsqueeze(1)
        y = (dots * scales.double().unsqueeze(0)).sum(-1) * x_scale.double()
        if bias is not None:
            y = y + bias.double()
        return y.to(torch.float32).to(x.dtype).reshape(*lead, n)


register_family(Family(
    "w4a8-int", W4A8Int, examples=("w4a8-g128", "w4a8-g32"), algorithms=("gptq", "awq", "hqq", "smoothquant", "autoround"),
    kernels=("qcompile.codegen.cpp.integer",),
))  # fmt: skip
