"""``fp8-block`` / ``fp8-block-ue8m0`` in ONNX (opset 21): the e4m3 weight stays e4m3 in the file, the activations
are quantized in the graph as qcompile does it.

Weight: ``DequantizeLinear`` with ``block_size = 128`` along ``axis = 0`` on the code matrix stored transposed,
``float8e4m3fn [K, N]``, with its scales expanded along N, ``float32 [ceil(K/128), N]`` (element ``[g, n]`` is
``scales[n // 128, g]``): ``w[k, n] = float(q[n, k]) * scales[n // 128, k // 128]``.

Activation, per token and group of 128 inputs (K zero-padded to whole groups, then cut back)::

    s  = ReduceMax(Abs(x_group)) / 448        ue8m0: the next power of two at or above (Pow(2, Floor(Log(s) / ln 2)),
                                              then doubled or halved once to be >= s and < 2 s); 1 where not > 0
    xd = Cast<float>(Cast<float8e4m3fn>(Clip(x_group / s, -448, 448))) * s
    y  = MatMul(xd, w) (+ bias)

This is the scheme's formula with the scales applied before the sums instead of after: the e4m3 codes are the same,
the result differs from the reference by float32 rounding. The op ``qcompile_onnx::fp8_block_matmul`` and its
translation are defined here and added to :data:`qcompile.onnx.translations.TRANSLATION_TABLE` on import.
"""

from __future__ import annotations

import math

import torch
from onnxscript import opset21 as op

from qcompile.onnx import translations
from qcompile.onnx.base import Lowering
from qcompile.schemes.fp8_block import BLOCK, E4M3_MAX, cdiv, to_e4m3

FLOAT8E4M3FN = 17  # onnx.TensorProto.FLOAT8E4M3FN
FLOAT = 1


def pow2_at_or_above(s: torch.Tensor) -> torch.Tensor:
    """Eager form of the graph's ue8m0 rounding of float32 ``s > 0`` (see the module docstring)."""
    p = torch.pow(2.0, torch.floor(torch.log(s) / math.log(2.0)))
    p = torch.where(p < s, p * 2.0, p)
    return torch.where(p * 0.5 >= s, p * 0.5, p)


@torch.library.custom_op("qcompile_onnx::fp8_block_matmul", mutates_args=())
def fp8_block_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, in_features: int,
    ue8m0: int,
) -> torch.Tensor:  # fmt: skip
    """``x [..., K]``, ``qweight float8_e4m3fn [K, N]``, ``scales float32 [ceil(K/128), N]`` → ``[..., N]``: the
    ONNX nodes of the module docstring, in plain PyTorch."""
    k, groups = in_features, cdiv(in_features, BLOCK)
    w = qweight.to(torch.float32) * scales.repeat_interleave(BLOCK, 0)[:k]
    x2 = torch.nn.functional.pad(x.reshape(-1, k).to(torch.float32), (0, groups * BLOCK - k))
    g = x2.reshape(-1, groups, BLOCK)
    s = g.abs().amax(-1, keepdim=True) / E4M3_MAX
    if ue8m0:
        s = pow2_at_or_above(s)
    s = torch.where(s > 0, s, torch.ones_like(s))
    xd = (to_e4m3(g / s).to(torch.float32) * s).reshape(-1, groups * BLOCK)[:, :k]
    y = xd @ w
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[1])


@fp8_block_matmul.register_fake
def _(x, qweight, scales, bias, in_features, ue8m0):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


def _ints(values):
    return op.Constant(value_ints=list(values))


def _float(value: float):
    return op.Constant(value_float=float(value))


def translate(x, qweight, scales, bias, in_features: int, ue8m0: int):
    """The ONNX nodes of ``qcompile_onnx::fp8_block_matmul`` (see the module docstring)."""
    k, groups = in_features, cdiv(in_features, BLOCK)
    w = op.DequantizeLinear(qweight, scales, axis=0, block_size=BLOCK)
    x2 = op.Reshape(x, _ints([-1, k]))
    if groups * BLOCK != k:
        x2 = op.Pad(x2, _ints([0, 0, 0, groups * BLOCK - k]))
    g = op.Reshape(x2, _ints([-1, groups, BLOCK]))
    s = op.Div(op.ReduceMax(op.Abs(g), _ints([-1]), keepdims=1), _float(E4M3_MAX))
    if ue8m0:
        p = op.Pow(_float(2.0), op.Floor(op.Div(op.Log(s), _float(math.log(2.0)))))
        p = op.Where(op.Less(p, s), op.Mul(p, _float(2.0)), p)
        half = op.Mul(p, _float(0.5))
        s = op.Where(op.GreaterOrEqual(half, s), half, p)
    s = op.Where(op.Greater(s, _float(0.0)), s, _float(1.0))
    q = op.Cast(op.Clip(op.Div(g, s), _float(-E4M3_MAX), _float(E4M3_MAX)), to=FLOAT8E4M3FN)
    xd = op.Reshape(op.Mul(op.Cast(q, to=FLOAT), s), _ints([-1, groups * BLOCK]))
    if groups * BLOCK != k:
        xd = op.Slice(xd, _ints([0]), _ints([k]), _ints([1]))
    y = op.MatMul(xd, w)
    if bias is not None:
        y = op.Add(y, bias)
    shape = op.Concat(op.Shape(x, start=0, end=-1), op.Shape(w, start=1), axis=0)
    return op.Reshape(y, shape)


translations.TRANSLATION_TABLE.setdefault(torch.ops.qcompile_onnx.fp8_block_matmul.default, translate)


def lower(site, scheme, packed, in_features, options):
    n = packed.qweight.shape[0]
    tensors = {
        "qweight": packed.qweight.t().contiguous(),
        "scales": packed.scales.t().repeat_interleave(BLOCK, 1)[:, :n].contiguous(),
    }
    op_name = "DequantizeLinear(fp8, 128x128 blocks)+MatMul, e4m3 activations per 128"
    return Lowering(torch.ops.qcompile_onnx.fp8_block_matmul.default, tensors, (in_features, int(scheme.ue8m0)),
                    op_name)  # fmt: skip
