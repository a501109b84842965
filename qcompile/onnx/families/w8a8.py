"""``w8a8`` (int8 weights per channel, int8 activations per token) in ONNX, with qcompile's exact numerics.

The activation is quantized in the graph as qcompile does it (symmetric, one scale per row)::

    x_scale = ReduceMax(Abs(x), -1) / 127  (1 where 0)     x_q = Cast<int8>(Clip(Round(x / x_scale), -127, 127))
    y = Cast<float>(MatMulInteger(x_q, W_t)) * x_scale * scales (+ bias)

``W_t`` is the int8 weight transposed, ``[K, N]``; ``scales`` is ``float32 [N]``. ``DynamicQuantizeLinear``
is not used: it is asymmetric, per tensor and uint8, which are different numerics.
"""

from __future__ import annotations

import torch

from qcompile.onnx.base import Lowering


def lower(site, scheme, packed, in_features, options):
    tensors = {"qweight": packed.qweight.t().contiguous(), "scales": packed.scales.reshape(-1).contiguous()}
    return Lowering(torch.ops.qcompile_onnx.w8a8_matmul.default, tensors, (), "MatMulInteger (per-token int8)")
