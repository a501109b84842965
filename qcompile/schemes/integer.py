"""Integer weight-only schemes: W8A16, W4A16, W3A16, W2A16 (``int8``, ``int4-g128``, ``int3-g64-sym`` …).

Formula, per group of ``group_size`` consecutive elements along K (per output channel when no ``-gN``)::

    symmetric:   w = (u - 2**(bits-1)) * scale          scale = absmax / (2**(bits-1) - 1)
    asymmetric:  w = (u - zero) * scale                 scale = (max - min) / (2**bits - 1), zero = -min / scale

``u`` is the unsigned code in ``[0, 2**bits)``; ``zero`` is a float (not rounded), so the group's
minimum and maximum are represented exactly. For ``bits == 8`` the code is stored *signed*
(``q = u - 128`` as ``int8``): symmetric int8 is then simply ``w = q * scale`` with ``q`` in [-127, 127].

Packed tensors (canonical layout):

| tensor    | dtype   | shape                        | notes                                            |
|-----------|---------|------------------------------|--------------------------------------------------|
| `qweight` | int8    | `[N, K_padded]`              | bits = 8: signed codes                           |
| `qweight` | uint8   | `[N, K_padded * bits / 8]`   | bits < 8: element order in `qcompile.schemes.packing` |
| `scales`  | float32 | `[N, K_padded / group_size]` |                                                  |
| `zeros`   | float32 | `[N, K_padded / group_size]` | asymmetric only, in code units (bits = 8: signed code) |

Bits per weight: ``bits + 32 / group_size`` (symmetric) or ``bits + 64 / group_size`` (asymmetric).

K not a multiple of the group size: the last group is **padded with zeros** to a whole group
(``K_padded = ceil(K / group_size) * group_size``); the padding never meets an activation. Per-channel
schemes pad K only to a whole packing unit (2, 8 or 4 elements for 4, 3 and 2 bits). The plan table
shows every padded site.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from qcompile.schemes.base import PackedWeight, QuantizedWeight, Scheme, TensorSpec, ceil_to, pad_columns
from qcompile.schemes.packing import ELEMENTS_PER_UNIT, pack_codes, packed_row_bytes, unpack_codes
from qcompile.schemes.registry import Family, register_family

SUPPORTED_BITS = (2, 3, 4, 8)
_NAME = re.compile(r"^int(?P<bits>[2348])(?:-g(?P<group>\d+))?(?:-(?P<sym>sym|asym))?$")


@dataclasses.dataclass(frozen=True)
class IntWeightOnly(Scheme):
    """``bits``-bit integer weights, float activations (WxA16)."""

    bits: int = 4
    group_size: int | None = 128  # None: one group per output channel
    symmetric: bool = False
    version: int = 1

    family = "int-weight-only"

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"int weight-only bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size is not None and (self.group_size < 8 or self.group_size % 8):
            raise ValueError(f"group_size must be a multiple of 8 (>= 8), got {self.group_size}")

    @property
    def name(self) -> str:
        out = f"int{self.bits}"
        if self.group_size is not None:
            out += f"-g{self.group_size}"
        default_symmetric = self.bits == 8
        if self.symmetric != default_symmetric:
            out += "-sym" if self.symmetric else "-asym"
        return out

    @classmethod
    def from_name(cls, name: str):
        m = _NAME.match(name)
        if not m:
            return None
        bits = int(m["bits"])
        group = int(m["group"]) if m["group"] else None
        symmetric = {"sym": True, "asym": False, None: bits == 8}[m["sym"]]
        return cls(bits=bits, group_size=group, symmetric=symmetric)

    # -- geometry -------------------------------------------------------------------------------
    def integer_grid(self) -> IntWeightOnly:
        return self

    def padded_in_features(self, in_features: int) -> int:
        if self.group_size is not None:
            return ceil_to(in_features, self.group_size)
        return ceil_to(in_features, ELEMENTS_PER_UNIT.get(self.bits, 1))

    def group_size_for(self, in_features: int) -> int:
        return self.group_size or self.padded_in_features(in_features)

    def tensors(self, out_features, in_features):
        kp = self.padded_in_features(in_features)
        groups = kp // self.group_size_for(in_features)
        if self.bits == 8:
            qweight = TensorSpec("qweight", (out_features, kp), torch.int8, "signed codes q = u - 128")
        else:
            qweight = TensorSpec("qweight", (out_features, packed_row_bytes(self.bits, kp)), torch.uint8,
                                 f"{self.bits}-bit unsigned codes packed along K (qcompile.schemes.packing)")
        scales = TensorSpec("scales", (out_features, groups), torch.float32, "one scale per group")
        if self.symmetric:
            return qweight, scales
        return qweight, scales, TensorSpec("zeros", (out_features, groups), torch.float32, "zero point per group, "
                                           "in code units (float)")  # fmt: skip

    # -- reference quantization -------------------------------------------------------------------
    def _grouped(self, weight: torch.Tensor) -> torch.Tensor:
        n, k = weight.shape
        kp = self.padded_in_features(k)
        return pad_columns(weight.to(torch.float32), kp).reshape(n, kp // self.group_size_for(k), -1)

    def compute_scales(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Round-to-nearest ``scales, zeros`` (``[N, groups]``) for a float ``[N, K]`` weight."""
        groups = self._grouped(weight)
        if self.symmetric:
            absmax = groups.abs().amax(-1)
            scales = absmax / (2 ** (self.bits - 1) - 1)
            return torch.where(scales > 0, scales, torch.ones_like(scales)), None
        lo, hi = groups.amin(-1), groups.amax(-1)
        scales = (hi - lo) / (2**self.bits - 1)
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        return scales, -lo / scales

    def quantize_with(self, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> QuantizedWeight:
        """Codes for ``weight`` under given ``scales``/``zeros`` (used by calibration algorithms too)."""
        n, k = weight.shape
        groups = self._grouped(weight)
        offset = zeros.unsqueeze(-1) if zeros is not None else 2 ** (self.bits - 1)
        u = torch.clamp(torch.round(groups / scales.unsqueeze(-1) + offset), 0, 2**self.bits - 1)
        if self.symmetric:
            u = torch.clamp(u, 1, 2**self.bits - 1)  # symmetric range: -(2**(b-1) - 1) .. 2**(b-1) - 1
        codes = u.reshape(n, -1)
        codes = (codes - 128).to(torch.int8) if self.bits == 8 else codes.to(torch.uint8)
        zeros_out = None
        if zeros is not None:
            zeros_out = (zeros - 128 if self.bits == 8 else zeros).to(torch.float32).contiguous()
        return QuantizedWeight(codes.contiguous(), scales.to(torch.float32).contiguous(), zeros_out, k)

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D [N, K] weight, got shape {list(weight.shape)}")
        scales, zeros = self.compute_scales(weight)
        return self.quantize_with(weight, scales, zeros)

    def dequantize(self, q: QuantizedWeight) -> torch.Tensor:
        n, kp = q.codes.shape
        groups = q.scales.shape[1]
        codes = q.codes.to(torch.float32).reshape(n, groups, kp // groups)
        if q.zeros is not None:
            codes = codes - q.zeros.unsqueeze(-1)
        elif self.bits < 8:
            codes = codes - 2 ** (self.bits - 1)
        w = codes * q.scales.unsqueeze(-1)
        return w.reshape(n, kp)[:, : q.in_features]

    def pack(self, q: QuantizedWeight) -> PackedWeight:
        qweight = q.codes if self.bits == 8 else pack_codes(q.codes, self.bits)
        tensors = {"qweight": qweight.contiguous(), "scales": q.scales}
        if q.zeros is not None:
            tensors["zeros"] = q.zeros
        return self.checked_pack(PackedWeight(tensors), q.out_features, q.in_features)

    def unpack(self, packed: PackedWeight, in_features: int) -> QuantizedWeight:
        kp = self.padded_in_features(in_features)
        codes = packed["qweight"] if self.bits == 8 else unpack_codes(packed["qweight"], self.bits, kp)
        return QuantizedWeight(codes, packed["scales"], packed.get("zeros"), in_features)


class QuantizedActivations:
    """Mixin for schemes that keep an :class:`IntWeightOnly` scheme's weights (codes, packing, geometry) and
    change only how activations are treated at run time: every weight method delegates to ``self.weights``."""

    quantizes_activations = True

    @property
    def weights(self) -> IntWeightOnly:
        raise NotImplementedError

    def padded_in_features(self, in_features):
        return self.weights.padded_in_features(in_features)

    def group_size_for(self, in_features):
        return self.weights.group_size_for(in_features)

    def tensors(self, out_features, in_features):
        return self.weights.tensors(out_features, in_features)

    def integer_grid(self):
        return self.weights

    def quantize(self, weight):
        return self.weights.quantize(weight)

    def dequantize(self, q: QuantizedWeight):
        return self.weights.dequantize(q)

    def pack(self, q):
        return self.weights.pack(q)

    def unpack(self, packed: PackedWeight, in_features):
        return self.weights.unpack(packed, in_features)


register_family(Family(
    "int-weight-only", IntWeightOnly,
    examples=("int8", "int4", "int4-g32", "int4-g64", "int4-g128", "int4-g128-sym", "int3-g128", "int2-g64"),
    algorithms=("gptq", "awq", "hqq", "autoround"),
    kernels=("qcompile.codegen.cpp.integer", "qcompile.codegen.triton.paths"),
    onnx="qcompile.onnx.families.integer:lower",
))  # fmt: skip
