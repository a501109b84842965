"""Eager modules that call the ``qcompile::*`` ops (what :func:`qcompile.quantize` swaps in)."""

from __future__ import annotations

import torch

from qcompile.schemes import PackedWeight, parse_scheme


class QuantizedLinear(torch.nn.Module):
    """``y = x @ W.T + bias`` with ``W`` held packed by ``scheme``; a drop-in for ``nn.Linear``.

    Buffers: ``qweight``, ``scales`` and (asymmetric schemes) ``zeros``; ``bias`` stays a float parameter.
    The weight is frozen; gradients flow to the input (and bias), so adapters can train on top.
    """

    def __init__(self, in_features: int, out_features: int, scheme: str, packed: PackedWeight, bias=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = parse_scheme(scheme).name
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("zeros", packed.zeros)
        self.bias = None
        if bias is not None:
            self.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:  # the packed K may be padded: the op alone cannot tell K from K_padded
            raise ValueError(f"QuantizedLinear({self.scheme}): input has {x.shape[-1]} features, "
                             f"expected {self.in_features}")  # fmt: skip
        return torch.ops.qcompile.linear(x, self.qweight, self.scales, self.zeros, self.bias, self.scheme)

    def dequantized_weight(self) -> torch.Tensor:
        return parse_scheme(self.scheme).dequantize_packed(self.qweight, self.scales, self.zeros, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, "
                f"bias={self.bias is not None}")  # fmt: skip
