"""ONNX translations of the export-only ops in :mod:`qcompile.onnx.ops` (onnxscript, opset 21).

Each function receives the op's tensors as graph values (``None`` for an absent optional input) and its
integer attributes as Python ints, and emits the nodes named in the op table of :mod:`qcompile.onnx.ops`.
Activations are float32; the weights stay in their quantized initializers.
"""

from __future__ import annotations

import onnx
import torch
from onnxscript import opset21 as op
from onnxscript.values import Opset

from qcompile.onnx import ops  # noqa: F401  (registers torch.ops.qcompile_onnx.*)
OPSET = 21
INT8 = 3  # onnx.TensorProto.INT8
FLOAT = 1  # onnx.TensorProto.FLOAT
INT64 = 7  # onnx.TensorProto.INT64


def register_matmulnbits_schema() -> None:
    """Make ``com.microsoft::MatMulNBits`` (onnxruntime contrib op, version 1) known to onnx and onnxscript.

    Inputs ``A, B, scales, zero_points?, g_idx?, bias?``; attributes ``K, N, bits, block_size`` (required),
    ``accuracy_level`` (optional). Registered once per process; a schema already present (from another
    library) is kept.
    """
    try:
        onnx.defs.get_schema("MatMulNBits", 1, "com.microsoft")
        return
    except onnx.defs.SchemaError:
        pass
    param = onnx.defs.OpSchema.FormalParameter
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    attr = onnx.defs.OpSchema.Attribute
    integer = onnx.defs.OpSchema.AttrType.INT
    schema = onnx.defs.OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        "y = A @ dequantize(B).T: B block-quantized along K with 2/4/8 bits (onnxruntime contrib op).",
        inputs=[
            param("A", "T1"), param("B", "T2"), param("scales", "T1"),
            param("zero_points", "T3", param_option=optional),
            param("g_idx", "T4", param_option=optional), param("bias", "T1", param_option=optional),
        ],
        outputs=[param("Y", "T1")],
        type_constraints=[
            ("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations, scales, bias"),
            ("T2", ["tensor(uint8)", "tensor(int32)"], "packed weights"),
            ("T3", ["tensor(uint8)", "tensor(int32)", "tensor(float)", "tensor(float16)", "tensor(bfloat16)"],
             "zero points"),
            ("T4", ["tensor(int32)"], "group index"),
        ],
        attributes=[
            attr("K", integer, "input features"), attr("N", integer, "output features"),
            attr("bits", integer, "bits per weight"), attr("block_size", integer, "weights per block along K"),
            attr("accuracy_level", integer, "minimum compute accuracy (0: unset)", required=False),
        ],
    )  # fmt: skip
    onnx.defs.register_schema(schema)


register_matmulnbits_schema()
MICROSOFT = Opset("com.microsoft", 1)


def _ints(values):
    return op.Constant(value_ints=list(values))


def _float(value: float):
    return op.Constant(value_float=float(value))


def _add_bias(y, bias):
    return y if bias is None else op.Add(y, bias)


def matmul_nbits(x, B, scales, zero_points, bias, K: int, N: int, bits: int, block_size: int):
    inputs = [x, B, scales] if zero_points is None else [x, B, scales, zero_points]
    # accuracy_level 0: float activations, as qcompile computes (level 4 would quantize them to int8)
    y = MICROSOFT.MatMulNBits(*inputs, K=K, N=N, bits=bits, block_size=block_size, accuracy_level=0)
    return _add_bias(y, bias)


def dequantize_matmul(x, qweight, scales, zero_point, offset, bias, axis: int, block_size: int, rows: int,
                      in_features: int, out_features: int, packed4: int):  # fmt: skip
    inputs = [qweight, scales] if zero_point is None else [qweight, scales, zero_point]
    if block_size:
        w = op.DequantizeLinear(*inputs, axis=axis, block_size=block_size)
    else:
        w = op.DequantizeLinear(*inputs, axis=axis)
    if offset is not None:  # float zero points: w = u*s - z*s, per group of K rows
        groups = rows // block_size if block_size else 1
        w = op.Reshape(w, _ints([groups, rows // groups, out_features]))
        w = op.Reshape(op.Sub(w, offset), _ints([rows, out_features]))
    if rows != in_features:
        w = op.Slice(w, _ints([0]), _ints([in_features]), _ints([0]))
    return _add_bias(op.MatMul(x, w), bias)


def w8a8_matmul(x, qweight, scales, bias):
    absmax = op.ReduceMax(op.Abs(x), _ints([-1]), keepdims=1)
    x_scale = op.Div(absmax, _float(127.0))
    x_scale = op.Where(op.Greater(x_scale, _float(0.0)), x_scale, _float(1.0))
    x_q = op.Cast(op.Clip(op.Round(op.Div(x, x_scale)), _float(-127.0), _float(127.0)), to=INT8)
    acc = op.Cast(op.MatMulInteger(x_q, qweight), to=FLOAT)
    return _add_bias(op.Mul(op.Mul(acc, x_scale), scales), bias)


def lookup_matmul(x, qweight, scales, levels, bias, in_features: int):
    low = op.BitwiseAnd(qweight, op.Constant(value=_uint8(15)))
    high = op.BitShift(qweight, op.Constant(value=_uint8(4)), direction="RIGHT")
    codes = op.Concat(op.Unsqueeze(low, _ints([-1])), op.Unsqueeze(high, _ints([-1])), axis=-1)
    values = op.Gather(levels, op.Cast(codes, to=INT64))  # [N, K_padded/2, 2]
    groups = op.Shape(scales, start=1, end=2)
    values = op.Reshape(values, op.Concat(_ints([0]), groups, _ints([-1]), axis=0))
    w = op.Reshape(op.Mul(values, op.Unsqueeze(scales, _ints([-1]))), _ints([0, -1]))
    w = op.Slice(w, _ints([0]), _ints([in_features]), _ints([1]))
    return _add_bias(op.MatMul(x, op.Transpose(w, perm=[1, 0])), bias)


def _uint8(value: int):
    import onnx

    return onnx.helper.make_tensor("value", onnx.TensorProto.UINT8, [], [value])


TRANSLATION_TABLE = {
    torch.ops.qcompile_onnx.matmul_nbits.default: matmul_nbits,
    torch.ops.qcompile_onnx.dequantize_matmul.default: dequantize_matmul,
    torch.ops.qcompile_onnx.w8a8_matmul.default: w8a8_matmul,
    torch.ops.qcompile_onnx.lookup_matmul.default: lookup_matmul,
}
