"""Eager modules that call the ``qcompile::*`` ops (what :func:`qcompile.quantize` swaps in)."""

from __future__ import annotations

import torch

from qcompile.schemes import PackedWeight, parse_scheme


class QuantizedLinear(torch.nn.Module):
    """``y = x @ W.T + bias`` with ``W`` held packed by ``scheme``; a drop-in for ``nn.Linear``.

    Buffers: the scheme's declared packed tensors under their names (``qweight``, ``scales`` and, asymmetric
    schemes, ``zeros`` for the integer families); ``bias`` stays a float parameter.
    The weight is frozen; gradients flow to the input (and bias), so adapters can train on top.
    """

    def __init__(self, in_features: int, out_features: int, scheme: str, packed: PackedWeight, bias=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        parsed = parse_scheme(scheme)
        self.scheme = parsed.name
        parsed.check_packed(packed, out_features, in_features, where=f"QuantizedLinear({self.scheme})")
        self.tensor_names = tuple(packed.names())
        for name, tensor in packed.tensors().items():
            self.register_buffer(name, tensor)
        self.bias = None
        if bias is not None:
            self.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    def packed(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.tensor_names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qcompile.linear(x, self.packed(), self.bias, self.scheme, self.in_features, self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        return parse_scheme(self.scheme).dequantize_packed(self.packed(), self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, "
                f"bias={self.bias is not None}")  # fmt: skip


class InputScaledLinear(QuantizedLinear):
    """``y = (x / input_divisor) @ Wq.T + bias`` where the packed ``Wq`` quantizes the layer's weight times
    ``input_divisor`` (an AWQ / SmoothQuant scale that no op before the layer could absorb: the option
    ``explicit_scales``), so ``y ≈ x @ W.T + bias``.

    Buffer ``input_divisor``: ``float32 [K]``, positive; the division runs in float32, the result in ``x``'s dtype.
    """

    def __init__(self, in_features: int, out_features: int, scheme: str, packed: PackedWeight, bias=None,
                 input_divisor: torch.Tensor | None = None):  # fmt: skip
        super().__init__(in_features, out_features, scheme, packed, bias)
        if input_divisor is None or tuple(input_divisor.shape) != (in_features,):
            got = "none" if input_divisor is None else f"{list(input_divisor.shape)}"
            raise ValueError(f"InputScaledLinear({self.scheme}): input_divisor is {got}, expected float32 "
                             f"[{in_features}]")  # fmt: skip
        self.register_buffer("input_divisor", input_divisor.detach().to(torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward((x.to(torch.float32) / self.input_divisor).to(x.dtype))

    def dequantized_weight(self) -> torch.Tensor:
        """``float32 [N, K]`` in the input's own scale (``Wq / input_divisor``)."""
        return super().dequantized_weight() / self.input_divisor.unsqueeze(0)

