"""optimum-quanto 0.2.7's weights (``qint2``, ``qint4``, ``qint8``, ``qfloat8``) and its static int8 activations.

Names: ``quanto-<weights>[-g<G>][-a8][-<dtype>]``: ``quanto-int4-g128`` (qint4, groups of 128, a bfloat16 model),
``quanto-int2-g64-fp16``, ``quanto-int4`` (one group per row), ``quanto-int8``, ``quanto-fp8-fp32``,
``quanto-int8-a8`` (qint8 weights, ``activations=qint8``). ``dtype`` is the model's dtype, in which quanto computes
its scales (:mod:`qcompile.schemes.peers`); 2- and 4-bit weights take ``bf16`` or ``fp16``.

quanto's formulas (``tensor/optimizers``, ``library/quantize.py``, ``tensor/qbits.py``, ``tensor/qbytes.py``), every
operation in the model dtype, per group of ``G`` weights along K (``qint2``/``qint4``) or per output row (8 bits)::

    qint2/4 (MaxOptimizer):   scale = (max - min) / (2**bits - 1)     shift = -min
                              u = clamp(round((w + shift) / scale), 0, 2**bits - 1)      w' = scale * u - shift
    qint8 (AbsmaxOptimizer):  scale = absmax / 127     q = clamp(round(w / scale), -128, 127)    w' = scale * q
    qfloat8:                  scale = absmax / 448     q = e4m3(clamp(w / scale, -448, 448))    w' = scale * q

``round`` is half to even. quanto picks the group itself (``nn/qmodule.py``): 128, or for K > 128 not a multiple of
128 the largest of 96, 64, 32 that divides K (K = 576: groups of 96), else one group per row (``-g`` omitted here).
K that is not a multiple of the group is zero-padded to whole groups as ``int-weight-only`` pads (quanto never
does that). A constant group (``scale = 0``) makes quanto divide 0 by 0; its weight is ``-shift`` whatever the
code, so qcompile stores scale 1 and code 0, which dequantizes to the same ``-shift``.

Packed tensors: those of the ``int-weight-only`` scheme of the same grid (``int4-g128``, ``int2-g64``, ``int4``
asymmetric; ``int8``), or ``fp8``'s (``qweight float8_e4m3fn [N, K]``, ``scales float32 [N, 1]``):

| tensor        | dtype             | shape                   | holds                                            |
|---------------|-------------------|-------------------------|--------------------------------------------------|
| `qweight`     | uint8 / int8 / e4m3 | as the layout         | quanto's codes ``u`` (unsigned) / ``q``           |
| `scales`      | float32           | `[N, groups]` / `[N, 1]` | quanto's ``scale`` (a value of the model dtype)  |
| `zeros`       | float32           | `[N, groups]`           | 2/4 bits: ``shift / scale`` (code units)          |
| `input_scale` | float32           | `[1]`                   | ``-a8``: the static activation scale              |

``shift`` comes back as ``zeros * scales`` rounded to the model dtype (exactly: :mod:`qcompile.schemes.peers`).

``-a8`` (``activations=qint8``, weights qint8) quantizes each activation with one scale per tensor, found by
calibration (``algorithm: static-activations``, :mod:`qcompile.algorithms.static_activations`; without it the scale
is quanto's initial 1). The forward, as quanto's ``qbytes_mm`` runs it on CPU, every rounding in ``x.dtype``::

    x_q = clamp(round(x / input_scale), -128, 127)                 (int8)
    y   = float32(sum_k x_q * q) * (input_scale * scale[n])  -> x.dtype,  then + bias in x.dtype
"""

from __future__ import annotations

import dataclasses
import re

import torch

from qcompile.schemes import peers
from qcompile.schemes.base import QuantizedWeight
from qcompile.schemes.fp8 import E4M3_MAX, FP8
from qcompile.schemes.integer import IntWeightOnly
from qcompile.schemes.registry import Family, register_family

WEIGHTS = ("int2", "int4", "int8", "fp8")
_NAME = re.compile(r"^quanto-(?P<weights>int2|int4|int8|fp8)(?:-g(?P<group>\d+))?(?P<a8>-a8)?$")
INT8_MIN, INT8_MAX = -128, 127


def quanto_group_size(in_features: int) -> int | None:
    """The group quanto's ``QModuleMixin`` picks for qint2/qint4 weights with ``in_features`` columns."""
    group = 128
    if in_features > group:
        while in_features % group != 0 and group > 32:
            group -= 32
        if in_features % group == 0:
            return group
    return None


@dataclasses.dataclass(frozen=True)
class Quanto(peers.PeerScheme):
    """optimum-quanto weights (and ``activations``: static per-tensor int8 inputs, qint8 weights only)."""

    weights: str = "int4"
    group_size: int | None = 128  # qint2 / qint4 only; None: one group per row
    activations: bool = False
    dtype: str = peers.DEFAULT_DTYPE
    version: int = 1

    family = "quanto"

    def __post_init__(self):
        if self.weights not in WEIGHTS:
            raise ValueError(f"quanto weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        bits = self.weights in ("int2", "int4")
        peers.check_dtype("quanto", self.dtype, ("bf16", "fp16") if bits else tuple(peers.DTYPES))
        if not bits and self.group_size is not None:
            raise ValueError(f"quanto {self.weights} weights are per row: no group size (got {self.group_size})")
        if bits and self.group_size is not None and (self.group_size < 8 or self.group_size % 8):
            raise ValueError(f"quanto group_size must be a multiple of 8, got {self.group_size}")
        if self.activations and self.weights != "int8":
            raise ValueError(f"quanto static int8 activations (-a8) go with int8 weights, not {self.weights}")

    @property
    def quantizes_activations(self) -> bool:  # type: ignore[override]
        return self.activations

    @property
    def static_input(self) -> bool:
        return self.activations

    @property
    def activation_mode(self):
        return "static-int8" if self.activations else None

    @property
    def name(self) -> str:
        group = f"-g{self.group_size}" if self.group_size is not None else ""
        return f"quanto-{self.weights}{group}{'-a8' if self.activations else ''}{peers.dtype_suffix(self.dtype)}"

    @classmethod
    def from_name(cls, name):
        rest, dtype = peers.split_dtype(name)
        m = _NAME.match(rest)
        if not m:
            return None
        group = int(m["group"]) if m["group"] else None
        return cls(m["weights"], group, bool(m["a8"]), dtype)

    @property
    def bits(self) -> int:
        return 8 if self.weights in ("int8", "fp8") else int(self.weights[3:])

    @property
    def layout(self):
        if self.weights == "fp8":
            return FP8()
        if self.weights == "int8":
            return IntWeightOnly(bits=8, group_size=None, symmetric=True)
        return IntWeightOnly(bits=self.bits, group_size=self.group_size, symmetric=False)

    # -- quanto's quantizers ------------------------------------------------------------------------------------
    def quantize(self, weight):
        if weight.dim() != 2:
            raise ValueError(f"{self.name}: expected a 2-D [N, K] weight, got shape {list(weight.shape)}")
        if self.weights in ("int2", "int4"):
            return self._quantize_bits(weight)
        q = self._quantize_rowwise(weight)
        if self.activations:
            return peers.StaticQuantizedWeight(q.codes, q.scales, None, q.in_features, torch.ones(1))
        return q

    def quantize_with_input_absmax(self, weight: torch.Tensor, absmax) -> peers.StaticQuantizedWeight:
        """The weights plus the input scale quanto's ``absmax_scale`` gives for an input absmax:
        ``absmax / 127`` in the model dtype."""
        if not self.activations:
            raise ValueError(f"{self.name} quantizes no activations: it has no input scale")
        q = self._quantize_rowwise(weight)
        scale = torch.as_tensor(absmax, dtype=torch.float32).reshape(1).to(self.torch_dtype) / INT8_MAX
        return peers.StaticQuantizedWeight(q.codes, q.scales, None, q.in_features, scale.to(torch.float32))

    def _quantize_rowwise(self, weight) -> QuantizedWeight:
        w = weight.to(self.torch_dtype)
        qmax = INT8_MAX if self.weights == "int8" else E4M3_MAX
        scale = w.abs().amax(1, keepdim=True) / qmax
        data = w / scale
        if self.weights == "int8":
            data = torch.clamp(torch.round(data), INT8_MIN, INT8_MAX)
            codes = torch.nan_to_num(data, nan=0.0).to(torch.int8)  # 0 / 0 rows: weight 0 whatever the code
        else:
            data = torch.clamp(data, -E4M3_MAX, E4M3_MAX)
            codes = torch.nan_to_num(data, nan=0.0).to(torch.float8_e4m3fn)
        return QuantizedWeight(codes.contiguous(), scale.to(torch.float32).contiguous(), None, weight.shape[1])

    def _quantize_bits(self, weight) -> QuantizedWeight:
        n, k = weight.shape
        layout, dtype = self.layout, self.torch_dtype
        kp = layout.padded_in_features(k)
        # per row, quanto's range is that of the K weights; padding columns (to a whole byte) are not part of it
        w = weight.to(dtype).reshape(n, 1, k) if self.group_size is None else peers.grouped(weight, layout, dtype)
        rmin, rmax = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = (rmax - rmin) / (2**self.bits - 1)
        shift = -rmin
        codes = torch.clamp(torch.round((w + shift) / scale), 0, 2**self.bits - 1)
        flat = scale == 0
        codes = torch.where(flat, torch.zeros_like(codes), codes).reshape(n, -1)
        codes = torch.nn.functional.pad(codes, (0, kp - codes.shape[1])).to(torch.uint8)
        scale = torch.where(flat, torch.ones_like(scale), scale).squeeze(-1)
        shift = shift.squeeze(-1)
        scales = scale.to(torch.float32)
        zeros = shift.to(torch.float32) / scales
        peers.check_recovered(self.name, (zeros * scales).to(dtype), shift)
        return QuantizedWeight(codes.contiguous(), scales.contiguous(), zeros.contiguous(), k)

    # -- quanto's dequantization, in a given dtype ---------------------------------------------------------------
    def dequantize_as(self, q, dtype):
        if self.weights not in ("int2", "int4"):
            return peers.rowwise_as(q, dtype)
        kp, compute = q.codes.shape[1], peers.compute_dtype(dtype, self.torch_dtype)
        shift = (q.zeros * q.scales).to(self.torch_dtype)  # back exactly (module docstring)
        scale = peers.expand_groups(q.scales.to(compute), kp)
        w = scale * q.codes.to(compute) - peers.expand_groups(shift.to(compute), kp)
        return w[:, : q.in_features].to(dtype)

    # -- static int8 activations --------------------------------------------------------------------------------
    def reference_linear(self, x, packed, bias, out_features):
        if not self.activations:
            return super().reference_linear(x, packed, bias, out_features)
        q = self.unpack_list(packed, out_features, x.shape[-1])
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        input_scale = q.input_scale.to(dtype)
        x_q = torch.clamp(torch.round(x2 / input_scale), INT8_MIN, INT8_MAX).to(torch.int8)
        out_scale = (input_scale * q.scales.to(dtype).reshape(1, -1)).to(torch.float32)
        y = (int8_matmul(x_q, q.codes) * out_scale).to(dtype)
        if bias is not None:
            y = y + bias.to(dtype)
        return y.reshape(*x.shape[:-1], out_features)


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [M, K] int8 @ b [N, K].T`` with exact integer sums, as float32 (rounded once, as ``int32 -> float32``)."""
    if a.shape[0] == 0:
        return torch.zeros((0, b.shape[0]), dtype=torch.float32, device=a.device)
    if a.device.type == "cpu":
        return torch._int_mm(a, b.t()).to(torch.float32)
    return (a.to(torch.float64) @ b.to(torch.float64).t()).to(torch.int32).to(torch.float32)


register_family(Family(
    "quanto", Quanto,
    examples=("quanto-int4-g128", "quanto-int2-g64-fp16", "quanto-int4", "quanto-int8", "quanto-fp8",
              "quanto-int8-a8", "quanto-int8-a8-fp32"),
    algorithms=("static-activations",),
    kernels=("qcompile.codegen.cpp.peers", "qcompile.codegen.triton.peers"),
    onnx="qcompile.onnx.families.peers:lower",
))  # fmt: skip
