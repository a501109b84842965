"""torchao 0.18's weight-only and dynamic-activation configs, as qcompile schemes.

Names: ``torchao-<weights>[-g<G>][-a8][-<dtype>]``; ``dtype`` is the model's (``bf16`` by default; see
:mod:`qcompile.schemes.peers`), in which torchao computes its scales:

| scheme              | torchao 0.18 config                                                                 | layout      |
|---------------------|-------------------------------------------------------------------------------------|-------------|
| `torchao-int4-g128` | `Int4WeightOnlyConfig(128)`; on CPU `PrototypeInt4WeightOnlyConfig(128)` (tinygemm) | `int4-g128` |
| `torchao-int8`      | `Int8WeightOnlyConfig()` (PerRow)                                                   | `int8`      |
| `torchao-int8-a8`   | `Int8DynamicActivationInt8WeightConfig()` (PerRow, symmetric)                       | `int8`      |
| `torchao-fp8`       | `Float8WeightOnlyConfig()` (PerRow)                                                 | `fp8`       |
| `torchao-fp8-a8`    | `Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`                   | `fp8`       |

Formulas (``quantization/quant_primitives.py``, ``quantize_/workflows``), in the model dtype unless stated:

* int4 (``_choose_qparams_affine_tinygemm``, ``_quantize_affine_tinygemm``; group ``G`` in 32, 64, 128)::

      scale = max((max - min) / 15, 1e-6)      zero_point = min + scale * 8
      u = clamp(round((w - (zero_point - scale * 8)) / scale), 0, 15)       w' = (u - 8) * scale + zero_point

  Packed as ``int4-gG``: ``zeros = 8 - zero_point / scale`` (float32, code units); ``zero_point`` is
  ``(8 - zeros) * scale`` rounded to the dtype. torchao leaves a weight whose K is not a multiple of G float;
  qcompile zero-pads it to whole groups.
* int8, weights and ``-a8`` activations per row / per token (``choose_qparams_affine`` SYMMETRIC on [-128, 127])::

      scale = max(max(|min|, |max|) / 127.5, 2**-23) -> float32     q = clamp(round(w * (1 / scale)), -128, 127)

  ``w * (1 / scale)`` is a float32 product. Weight-only: ``w' = float32(q) * scale``, rounded to the activation
  dtype. ``-a8`` forward (``Int8Tensor`` linear, ``_int_scaled_matmul_cpu``), ``x.dtype`` roundings::

      y = float32(float32(sum_k x_q * q) * x_scale[m] -> x.dtype) * scale[n] + bias -> x.dtype

* fp8 (``_choose_scale_float8``, ``_quantize_affine_float8``): ``scale = absmax / 448 -> float32``,
  ``q = e4m3(clamp(float32(w) / scale, -448, 448))``; the same per token for ``-a8`` activations, then
  ``y = (sum_k x_q * q) * x_scale[m] * scale[n] + bias`` in float32 (as ``torch._scaled_mm``), -> ``x.dtype``.
  An all-zero row makes torchao divide by zero (NaN codes); qcompile gives it scale 1 and codes 0.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from qcompile.schemes import peers
from qcompile.schemes.base import QuantizedWeight
from qcompile.schemes.fp8 import E4M3_MAX, FP8
from qcompile.schemes.integer import IntWeightOnly
from qcompile.schemes.quanto import int8_matmul
from qcompile.schemes.registry import Family, register_family

WEIGHTS = ("int4", "int8", "fp8")
INT4_GROUPS = (32, 64, 128)
INT4_EPS = 1e-6  # Int4OpaqueTensor.from_hp
INT8_EPS = torch.finfo(torch.float32).eps  # Int8Tensor.from_hp
INT8_HALF_RANGE = (127 - (-128)) / 2  # 127.5
_NAME = re.compile(r"^torchao-(?P<weights>int4|int8|fp8)(?:-g(?P<group>\d+))?(?P<a8>-a8)?$")


def int8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's symmetric int8 per row of ``t [M, K]`` (its dtype is the compute dtype):
    ``(int8 [M, K], float32 [M, 1])``."""
    zero = torch.zeros((), dtype=t.dtype)
    lo = torch.minimum(t.amin(1, keepdim=True), zero)
    hi = torch.maximum(t.amax(1, keepdim=True), zero)
    scale = torch.clamp(torch.maximum(-lo, hi) / INT8_HALF_RANGE, min=INT8_EPS).to(torch.float32)
    codes = torch.clamp(torch.round(t * (1.0 / scale)), -128, 127).to(torch.int8)
    return codes, scale


def fp8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's float8 e4m3 per row of ``t [M, K]``: ``(float8_e4m3fn [M, K], float32 [M, 1])`` (scale 1 and codes
    0 for an all-zero row, where torchao divides by zero)."""
    scale = (t.abs().amax(1, keepdim=True) / E4M3_MAX).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(t.to(torch.float32) / scale, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, scale


@dataclasses.dataclass(frozen=True)
class Torchao(peers.PeerScheme):
    """torchao int4 (tinygemm) / int8 / float8 weights; ``activations``: dynamic per-token int8 or float8."""

    weights: str = "int4"
    group_size: int | None = 128  # int4 only
    activations: bool = False
    dtype: str = peers.DEFAULT_DTYPE
    version: int = 1

    family = "torchao"

    def __post_init__(self):
        if self.weights not in WEIGHTS:
            raise ValueError(f"torchao weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        int4 = self.weights == "int4"
        peers.check_dtype("torchao", self.dtype, ("bf16", "fp16") if int4 else tuple(peers.DTYPES))
        if int4 and self.group_size not in INT4_GROUPS:
            raise ValueError(f"torchao int4 groups are {', '.join(map(str, INT4_GROUPS))}, got {self.group_size}")
        if not int4 and self.group_size is not None:
            raise ValueError(f"torchao {self.weights} weights are per row: no group size (got {self.group_size})")
        if int4 and self.activations:
            raise ValueError("torchao int4 weights are weight-only here (-a8 goes with int8 or fp8)")

    @property
    def quantizes_activations(self) -> bool:  # type: ignore[override]
        return self.activations

    @property
    def activation_mode(self):
        return f"token-{self.weights}" if self.activations else None

    def kernel_layout(self, dtype):
        if self.activations and self.weights == "fp8" and dtype == torch.float32:
            return FP8(activations=True)  # float32 activations: torchao's numbers are fp8-w8a8's, step for step
        return super().kernel_layout(dtype)

    @property
    def name(self) -> str:
        group = f"-g{self.group_size}" if self.group_size is not None else ""
        return f"torchao-{self.weights}{group}{'-a8' if self.activations else ''}{peers.dtype_suffix(self.dtype)}"

    @classmethod
    def from_name(cls, name):
        rest, dtype = peers.split_dtype(name)
        m = _NAME.match(rest)
        if not m:
            return None
        group = int(m["group"]) if m["group"] else None
        return cls(m["weights"], group, bool(m["a8"]), dtype)

    @property
    def layout(self):
        if self.weights == "fp8":
            return FP8()
        if self.weights == "int8":
            return IntWeightOnly(bits=8, group_size=None, symmetric=True)
        return IntWeightOnly(bits=4, group_size=self.group_size, symmetric=False)

    # -- torchao's quantizers ------------------------------------------------------------------------------------
    def quantize(self, weight):
        if weight.dim() != 2:
            raise ValueError(f"{self.name}: expected a 2-D [N, K] weight, got shape {list(weight.shape)}")
        k = weight.shape[1]
        if self.weights == "int8":
            codes, scale = int8_rows(weight.to(self.torch_dtype))
            return QuantizedWeight(codes.contiguous(), scale.contiguous(), None, k)
        if self.weights == "fp8":
            codes, scale = fp8_rows(weight.to(self.torch_dtype))
            return QuantizedWeight(codes.contiguous(), scale.contiguous(), None, k)
        return self._quantize_int4(weight)

    def _quantize_int4(self, weight) -> QuantizedWeight:
        n, k = weight.shape
        dtype = self.torch_dtype
        w = peers.grouped(weight, self.layout, dtype)
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = torch.clamp((hi - lo) / 15.0, min=INT4_EPS)
        zero_point = lo + scale * 8.0
        codes = torch.clamp(torch.round((w - (zero_point - scale * 8.0)) / scale), 0, 15).reshape(n, -1)
        scale, zero_point = scale.squeeze(-1), zero_point.squeeze(-1)
        scales = scale.to(torch.float32)
        zeros = 8.0 - zero_point.to(torch.float32) / scales
        peers.check_recovered(self.name, ((8.0 - zeros) * scales).to(dtype), zero_point)
        return QuantizedWeight(codes.to(torch.uint8).contiguous(), scales.contiguous(), zeros.contiguous(), k)

    # -- torchao's dequantization, in a given dtype --------------------------------------------------------------
    def dequantize_as(self, q, dtype):
        if self.weights != "int4":
            return peers.rowwise_as(q, dtype)
        kp, compute = q.codes.shape[1], peers.compute_dtype(dtype, self.torch_dtype)
        zero_point = ((8.0 - q.zeros) * q.scales).to(self.torch_dtype)  # back exactly (module docstring)
        w = (q.codes.to(compute) - 8) * peers.expand_groups(q.scales.to(compute), kp)
        return (w + peers.expand_groups(zero_point.to(compute), kp))[:, : q.in_features].to(dtype)

    # -- dynamic activations --------------------------------------------------------------------------------------
    def reference_linear(self, x, packed, bias, out_features):
        if not self.activations:
            return super().reference_linear(x, packed, bias, out_features)
        q = self.unpack_list(packed, out_features, x.shape[-1])
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        w_scale = q.scales.reshape(1, -1)
        if self.weights == "int8":
            x_q, x_scale = int8_rows(x2)
            y = (int8_matmul(x_q, q.codes) * x_scale).to(dtype) * w_scale
        else:
            x_q, x_scale = fp8_rows(x2)
            y = (x_q.to(torch.float32) @ q.codes.to(torch.float32).t()) * x_scale * w_scale
        if bias is not None:
            y = y + bias.to(dtype)
        return y.to(dtype).reshape(*x.shape[:-1], out_features)


register_family(Family(
    "torchao", Torchao,
    examples=("torchao-int4-g128", "torchao-int4-g32-fp16", "torchao-int8", "torchao-int8-a8", "torchao-fp8",
              "torchao-fp8-a8", "torchao-int8-a8-fp32"),
    kernels=("qcompile.codegen.cpp.peers", "qcompile.codegen.triton.peers"),
    onnx="qcompile.onnx.families.peers:lower",
))  # fmt: skip
