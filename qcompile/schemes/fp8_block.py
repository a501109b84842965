"""Block-scaled FP8, W8A8: ``fp8-block`` (DeepSeek-V3 / transformers ``FINEGRAINED_FP8`` / compressed-tensors
``FP8_BLOCK``) and ``fp8-block-ue8m0`` (every scale rounded up to a power of two, DeepSeek's ``scale_fmt="ue8m0"``).

Weights: one float32 scale per 128 × 128 block of ``W [N, K]`` (edge blocks are partial; nothing is padded)::

    scales[i, j] = amax(W[128 i : 128 i + 128, 128 j : 128 j + 128]) / 448      (1 for an all-zero block)
    qweight[n, k] = e4m3(clamp(W[n, k] / scales[n // 128, k // 128], -448, 448))
    w[n, k] = float(qweight[n, k]) * scales[n // 128, k // 128]

``scales`` is the dequantization multiplier (DeepSeek's ``weight_scale_inv``, compressed-tensors' ``weight_scale``).

Activations, at run time, per token ``m`` and per group ``g`` of 128 elements along K (the last one partial)::

    s[m, g] = amax(x[m, 128 g : 128 g + 128]) / 448      (1 when the group is all zero)
    xq[m, k] = e4m3(clamp(x[m, k] / s[m, k // 128], -448, 448))
    y[m, n] = sum_g (sum_{k in g} float(xq[m, k]) * float(qweight[n, k])) * s[m, g] * scales[n // 128, g] + bias[n]

Every scale is computed in float32 (``amax / 448``, then for ``-ue8m0`` the next power of two at or above it, read
from the float's bits: ``2 ** (exponent + (mantissa != 0))``); divisions are float32, e4m3 rounding is to nearest
even. The reference below sums each group exactly (float64: a product of two e4m3 values has 8 significant bits)
and combines the groups in float64, then casts to ``x.dtype``.

Packed tensors, for ``W [N, K]``::

    qweight  float8_e4m3fn [N, K]                          codes, row-major
    scales   float32       [ceil(N / 128), ceil(K / 128)]  block multipliers, element [i, j] for rows 128 i..,
                                                           columns 128 j..

8 + 32 / (128 * 128) bits per weight (exactly, when N and K are multiples of 128).
"""

from __future__ import annotations

import dataclasses

import torch

from qcompile.schemes.base import PackedWeight, Scheme, TensorSpec, describe
from qcompile.schemes.registry import Family, register_family

E4M3_MAX = 448.0
BLOCK = 128
_NAMES = {"fp8-block": False, "fp8-block-ue8m0": True}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up_pow2(scale: torch.Tensor) -> torch.Tensor:
    """float32 ``scale > 0`` → ``2 ** (exponent + (mantissa != 0))`` from its bits (DeepSeek's ``ue8m0`` rounding)."""
    bits = scale.to(torch.float32).view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    exponent = exponent + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exponent << 23).view(torch.float32)


def block_scale(amax: torch.Tensor, ue8m0: bool) -> torch.Tensor:
    """float32 ``amax`` → the dequantization multiplier ``amax / 448`` (power of two with ``ue8m0``; 1 for 0)."""
    scale = amax.to(torch.float32) / E4M3_MAX
    if ue8m0:
        scale = round_up_pow2(scale)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def to_e4m3(values: torch.Tensor) -> torch.Tensor:
    """float32 → float8_e4m3fn after clamping to ±448 (round to nearest even)."""
    return torch.clamp(values, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def _blocks(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``[R, C]`` → zero-padded ``[R_blocks, rows, C_blocks, cols]``."""
    r, c = t.shape
    padded = torch.nn.functional.pad(t, (0, cdiv(c, cols) * cols - c, 0, cdiv(r, rows) * rows - r))
    return padded.reshape(cdiv(r, rows), rows, cdiv(c, cols), cols)


def expand_scales(scales: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """``[ceil(N/128), ceil(K/128)]`` → ``[N, K]``: each block's multiplier at every element of the block."""
    return scales.repeat_interleave(BLOCK, 0)[:out_features].repeat_interleave(BLOCK, 1)[:, :in_features]


def quantize_activations(x: torch.Tensor, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` → ``(xq float8_e4m3fn [M, K], s float32 [M, ceil(K / 128)])`` per token and group of 128."""
    m, k = x.shape
    groups = _blocks(x.to(torch.float32), 1, BLOCK).reshape(m, cdiv(k, BLOCK), BLOCK)
    s = block_scale(groups.abs().amax(-1), ue8m0)
    xq = to_e4m3(groups / s.unsqueeze(-1)).reshape(m, -1)[:, :k]
    return xq, s


@dataclasses.dataclass
class BlockQuantizedWeight:
    """Unpacked form: ``codes float8_e4m3fn [N, K]``, ``scales float32 [ceil(N/128), ceil(K/128)]``."""

    codes: torch.Tensor
    scales: torch.Tensor
    in_features: int

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]


@dataclasses.dataclass(frozen=True)
class FP8Block(Scheme):
    """float8 e4m3 weights with one scale per 128 × 128 block × e4m3 activations with one scale per 128 inputs."""

    ue8m0: bool = False
    version: int = 1
    family = "fp8-block"
    quantizes_activations = True

    @property
    def name(self) -> str:
        return "fp8-block-ue8m0" if self.ue8m0 else "fp8-block"

    @classmethod
    def from_name(cls, name):
        return cls(ue8m0=_NAMES[name]) if name in _NAMES else None

    def padded_in_features(self, in_features):
        return in_features

    def group_size_for(self, in_features):
        return BLOCK

    def num_groups(self, in_features):
        return cdiv(in_features, BLOCK)

    def tensors(self, out_features, in_features):
        return (
            TensorSpec("qweight", (out_features, in_features), torch.float8_e4m3fn, "e4m3 codes [N, K], row-major"),
            TensorSpec("scales", (cdiv(out_features, BLOCK), cdiv(in_features, BLOCK)), torch.float32,
                       "dequantization multiplier per 128 x 128 block [ceil(N/128), ceil(K/128)]"),
        )  # fmt: skip

    def quantize(self, weight):
        if weight.dim() != 2:
            raise ValueError(f"{self.name}: the weight must be [N, K], got {describe(weight)}")
        n, k = weight.shape
        blocks = _blocks(weight.to(torch.float32), BLOCK, BLOCK)
        scales = block_scale(blocks.abs().amax((1, 3)), self.ue8m0)
        codes = to_e4m3(blocks / scales[:, None, :, None]).reshape(blocks.shape[0] * BLOCK, -1)[:n, :k]
        return BlockQuantizedWeight(codes.contiguous(), scales.contiguous(), k)

    def dequantize(self, q):
        return q.codes.to(torch.float32) * expand_scales(q.scales, q.out_features, q.in_features)

    def pack(self, q):
        packed = PackedWeight({"qweight": q.codes, "scales": q.scales})
        return self.checked_pack(packed, q.out_features, q.in_features)

    def unpack(self, packed: PackedWeight, in_features):
        return BlockQuantizedWeight(packed["qweight"], packed["scales"], in_features)

    def reference_linear(self, x, packed, bias, out_features):
        """The activation-quantized formula of the module docstring: exact group sums, float64 combination."""
        qweight, scales = (packed.list() if isinstance(packed, PackedWeight) else packed)
        k = x.shape[-1]
        lead = x.shape[:-1]
        xq, s = quantize_activations(x.reshape(-1, k), self.ue8m0)
        xq64, q64, s64 = xq.to(torch.float64), qweight.to(torch.float64), s.to(torch.float64)
        row_scales = scales.to(torch.float64).repeat_interleave(BLOCK, 0)[:out_features]  # [N, G]
        y = torch.zeros(xq.shape[0], out_features, dtype=torch.float64, device=x.device)
        for g in range(cdiv(k, BLOCK)):
            cols = slice(g * BLOCK, min(k, (g + 1) * BLOCK))
            y += (xq64[:, cols] @ q64[:, cols].t()) * s64[:, g : g + 1] * row_scales[:, g]
        if bias is not None:
            y += bias.to(torch.float64)
        return y.to(x.dtype).reshape(*lead, out_features)


register_family(Family(
    "fp8-block", FP8Block, examples=("fp8-block", "fp8-block-ue8m0"), algorithms=("awq", "smoothquant"),
    kernels=("qcompile.codegen.cpp.fp8_block", "qcompile.codegen.triton.fp8_block"),
    onnx="qcompile.onnx.families.fp8_block:lower",
))  # fmt: skip
