"""What a scheme family hands the ONNX exporter for one quantized matmul site."""

from __future__ import annotations

import dataclasses

import torch

INT4_FORMATS = ("matmulnbits", "qdq")


class OnnxExportError(ValueError):
    """A model, site or scheme that cannot be exported to ONNX as asked, with where and what to do."""


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """Choices that change the ONNX form of a site (not its numerics).

    ``int4_format``: ``"matmulnbits"`` (``com.microsoft::MatMulNBits``) or ``"qdq"`` (standard
    ``DequantizeLinear`` with ``block_size``, opset 21, ``int4``/``uint4`` weights).
    """

    int4_format: str = "matmulnbits"

    def __post_init__(self):
        if self.int4_format not in INT4_FORMATS:
            raise OnnxExportError(f"int4_format must be one of {INT4_FORMATS}, got {self.int4_format!r}")


@dataclasses.dataclass
class Lowering:
    """One site in ONNX form: an export-only op of :mod:`qcompile.onnx.ops` and the tensors it reads.

    ``tensors`` are in the op's argument order after ``x`` (``None`` for an absent optional input) and
    are already in the exact ONNX layout. ``onnx_types`` names tensors whose ONNX element type torch
    cannot hold (``"uint4"``/``"int4"``): they travel as packed ``uint8`` and are retyped in the file to
    ``onnx_shapes[name]``. ``attrs`` are the op's trailing integer arguments.
    """

    op: torch._ops.OpOverload
    tensors: dict[str, torch.Tensor | None]
    attrs: tuple[int, ...]
    onnx_op: str  # what the file will contain, for reports: "MatMulNBits", "DequantizeLinear+MatMul", …
    onnx_types: dict[str, str] = dataclasses.field(default_factory=dict)
    onnx_shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values() if t is not None)
