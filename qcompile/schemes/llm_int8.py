"""LLM.int8() as bitsandbytes runs it (``Linear8bitLt`` with ``has_fp16_weights=False``, inference): ``llm-int8``
(outlier threshold 6.0) and ``llm-int8-t<threshold>`` (any finite threshold > 0, e.g. ``llm-int8-t4.5``).

Weights, row-wise int8 (bitsandbytes' ``int8_vectorwise_quant`` of the weight cast to float16)::

    scales[n]     = max_k |fp16(W[n, k])|                          (SCB; float32)
    qweight[n, k] = round_half_even(fp16(W[n, k]) * (127 / scales[n]))      (float32 operations)
    W_deq[n, k]   = qweight[n, k] * scales[n] * (1 / 127)                    (float32, in this order)

Activations ``x [M, K]``, per call. ``xh = fp16(x)`` (bitsandbytes quantizes a float16 copy); an element is an
outlier when ``|xh| >= threshold``, and its column is an outlier column. The outlier columns are multiplied in
float with the original ``x``; the rest in int8 with per-token scales that skip the outlier elements::

    r[m]      = max |xh[m, k]| over the elements that are not outliers            (0: the row's codes are 0)
    x_q[m, k] = round_half_even(xh[m, k] * (127 / r[m])), 0 in outlier columns    (float32 operations)
    y[m, n]   = float32(sum_k x_q[m, k] qweight[n, k]) * (scales[n] / 127) * (r[m] / 127)
                + sum_{k outlier column} x[m, k] W_deq[n, k] + bias[n]

The integer sum is exact. bitsandbytes' CPU backend folds both 1/127 into one constant it writes 6.200124e-05
(1/127**2 is 6.2000124e-05; CUDA uses 6.200012e-05), so its outputs sit about 1.8e-5 relative above these.

Packed tensors: ``qweight int8 [N, K]`` (bitsandbytes' ``CB``, the checkpoint's ``weight``), ``scales float32 [N]``
(``SCB``); 8 + 32/K bits per weight.
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch

from qcompile.schemes.base import PackedWeight, Scheme, TensorSpec
from qcompile.schemes.registry import Family, register_family
from qcompile.schemes.w8a8 import int8_matmul_exact

DEFAULT_THRESHOLD = 6.0
#: float32 1/127, the factor bitsandbytes' ``int8_vectorwise_dequant`` multiplies by
INV_127 = 7.874015718698502e-3
_NAME = re.compile(r"^llm-int8(?:-t(?P<threshold>.+))?$")


def threshold_text(threshold: float) -> str:
    """Shortest decimal form that reads back to ``threshold`` (``6``, ``4.5``, ``0.1``)."""
    text = repr(float(threshold))
    return text[:-2] if text.endswith(".0") else text


@dataclasses.dataclass
class Int8Rows:
    """Unpacked ``llm-int8`` weight: ``codes int8 [N, K]``, ``scales float32 [N]`` (row absmax, SCB)."""

    codes: torch.Tensor
    scales: torch.Tensor

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]


def quantize_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' ``int8_vectorwise_quant`` (no threshold) of float16 ``values [R, C]``: ``(codes int8 [R, C],
    row absmax float32 [R])``; an all-zero row gets codes 0."""
    absmax = values.abs().amax(-1).to(torch.float32)
    step = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    return torch.round(values.to(torch.float32) * step.unsqueeze(-1)).to(torch.int8), absmax


def split_activations(x2: torch.Tensor, threshold: float):
    """``x2 [M, K]`` → ``(codes int8 [M, K], row_scale float32 [M] = r / 127, outlier columns bool [K])`` by the
    activation rule of the module docstring (codes are 0 in outlier columns)."""
    xh = x2.to(torch.float16).to(torch.float32)
    outliers = xh.abs() >= threshold
    columns = outliers.any(0)
    kept = torch.where(outliers, torch.zeros_like(xh), xh)
    absmax = kept.abs().amax(-1)
    step = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    codes = torch.round(kept * step.unsqueeze(-1))
    codes = torch.where(columns, torch.zeros_like(codes), codes).to(torch.int8)
    return codes, absmax / 127.0, columns


@dataclasses.dataclass(frozen=True)
class LLMInt8(Scheme):
    """Row-wise int8 weights; activations int8 per token except the outlier columns (float)."""

    threshold: float = DEFAULT_THRESHOLD
    version: int = 1
    family = "llm-int8"
    quantizes_activations = True

    def __post_init__(self):
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"llm-int8: the outlier threshold must be a finite number > 0, got {self.threshold!r}")

    @property
    def name(self) -> str:
        if self.threshold == DEFAULT_THRESHOLD:
            return "llm-int8"
        return f"llm-int8-t{threshold_text(self.threshold)}"

    @classmethod
    def from_name(cls, name: str):
        m = _NAME.match(name)
        if not m:
            return None
        if m["threshold"] is None:
            return cls()
        try:
            threshold = float(m["threshold"])
        except ValueError:
            raise ValueError(f"llm-int8: threshold {m['threshold']!r} in {name!r} is not a number") from None
        return cls(threshold=threshold)

    def padded_in_features(self, in_features: int) -> int:
        return in_features

    def tensors(self, out_features, in_features):
        return (TensorSpec("qweight", (out_features, in_features), torch.int8, "row-wise int8 codes (CB)"),
                TensorSpec("scales", (out_features,), torch.float32, "absmax of each float16 weight row (SCB)"))

    def quantize(self, weight: torch.Tensor) -> Int8Rows:
        if weight.dim() != 2:
            raise ValueError(f"{self.name}: expected a 2-D [N, K] weight, got shape {list(weight.shape)}")
        codes, scales = quantize_rows(weight.to(torch.float16))
        return Int8Rows(codes.contiguous(), scales.contiguous())

    def dequantize(self, q: Int8Rows) -> torch.Tensor:
        return q.codes.to(torch.float32) * q.scales.unsqueeze(-1) * INV_127

    def pack(self, q: Int8Rows) -> PackedWeight:
        return self.checked_pack(PackedWeight({"qweight": q.codes, "scales": q.scales}), q.out_features,
                                 q.in_features)  # fmt: skip

    def unpack(self, packed: PackedWeight, in_features: int) -> Int8Rows:
        return Int8Rows(packed["qweight"], packed["scales"])

    def reference_linear(self, x, packed, bias, out_features):
        qweight, scales = packed
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        codes, row_scale, columns = split_activations(x2, self.threshold)
        y = int8_matmul_exact(codes, qweight) * (scales * (1.0 / 127.0)).unsqueeze(0) * row_scale.unsqueeze(1)
        w = self.dequantize(Int8Rows(qweight, scales))
        outside = torch.where(columns, x2.to(torch.float32), torch.zeros((), dtype=torch.float32))
        y = y + outside @ w.t()
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y.to(x.dtype).reshape(*lead, out_features)


register_family(Family(
    "llm-int8", LLMInt8, examples=("llm-int8", "llm-int8-t4.5"),
    kernels=("qcompile.codegen.cpp.llm_int8", "qcompile.codegen.triton.llm_int8"),
))  # fmt: skip
