"""``fp8`` (float8 e4m3 weights, one float32 scale per output channel) in ONNX.

``DequantizeLinear`` (opset 19+) on the ``float8e4m3fn`` weight stored transposed ``[K, N]``, ``axis=1``,
scales ``float32 [N]``, then ``MatMul``: ``w = float(q) * scale``, as qcompile computes it.
``fp8-w8a8`` (activations quantized to e4m3 at run time) is not exported yet: a clear error.
"""

from __future__ import annotations

import torch

from qcompile.onnx.base import Lowering, OnnxExportError


def lower(site, scheme, packed, in_features, options):
    if scheme.activations:
        raise OnnxExportError(
            f"layer {site}: {scheme.name} (float8 activations) has no ONNX export yet; re-plan this layer as "
            f"fp8 (weight-only) or w8a8 (int8 activations)."
        )
    n = packed.qweight.shape[0]
    tensors = {
        "qweight": packed.qweight.t().contiguous(), "scales": packed.scales.reshape(-1).contiguous(),
        "zero_point": None, "offset": None,
    }  # fmt: skip
    attrs = (1, 0, in_features, in_features, n, 0)
    return Lowering(torch.ops.qcompile_onnx.dequantize_matmul.default, tensors, attrs, "DequantizeLinear(fp8)+MatMul")
