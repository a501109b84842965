"""``mxfp6`` and ``mxfp8`` (OCP MX 6- and 8-bit) in ONNX: element codes looked up in a table of their values.

The packed codes stay as qcompile stores them, as ``uint8``: fp8 ``[N, Kp]`` (the float8 tensor's bytes), fp6
``[N, Kp * 3 / 4]`` (4 codes in 3 bytes). The graph (op ``qcompile_onnx::mx_lookup_matmul``, defined here with its
translation, which this module adds to the exporter's table when it is imported) reads the codes (fp6: each 3 bytes
``Cast`` to uint32 and joined into a little-endian word, code ``i`` = ``(word >> 6i) & 63``), ``Gather``s the
``2**bits`` element values (from :attr:`qcompile.schemes.mx.ElementFormat.values`), multiplies by each group's unit
(``float32 [N, Kp / 32]``: ``2**(s - 127)``, the float32 values the reference uses), drops the padding columns and
runs ``MatMul``. Every input of that dequantization is an initializer, so onnxruntime folds it once when the session
starts. The unit table is float32 rather than the stored byte per group: the file holds ``bits + 1`` bits per weight.

``-w6a6`` / ``-w8a8`` forms (activations quantized at run time) have no ONNX form yet: a clear error naming the layer.
"""

from __future__ import annotations

import torch
from onnxscript import opset21 as op

from qcompile.onnx import translations
from qcompile.onnx.base import Lowering, OnnxExportError
from qcompile.schemes.mx import GROUP, unpack_fp6
from qcompile.schemes.mxfp4 import e8m0_decode

INT64 = 7  # onnx.TensorProto.INT64
UINT32 = 12  # onnx.TensorProto.UINT32


@torch.library.custom_op("qcompile_onnx::mx_lookup_matmul", mutates_args=())
def mx_lookup_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, levels: torch.Tensor, bias: torch.Tensor | None,
    in_features: int, bits: int,
) -> torch.Tensor:  # fmt: skip
    """``x [..., in_features] @ w.T (+ bias)``: ``w [N, Kp]`` the ``bits``-bit codes of ``qweight uint8`` (fp6: 4 in
    3 bytes) looked up in ``levels [2**bits]``, times ``scales [N, Kp / 32]`` per group, first ``in_features``
    columns."""
    n, groups = scales.shape
    kp = groups * GROUP
    codes = qweight if bits == 8 else unpack_fp6(qweight, kp)
    w = (levels[codes.long()].reshape(n, groups, GROUP) * scales.unsqueeze(-1)).reshape(n, kp)[:, :in_features]
    y = x.float() @ w.t()
    return (y if bias is None else y + bias).to(x.dtype)


@mx_lookup_matmul.register_fake
def _(x, qweight, scales, levels, bias, in_features, bits):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


def translate(x, qweight, scales, levels, bias, in_features: int, bits: int):
    """The ONNX nodes of ``qcompile_onnx::mx_lookup_matmul`` (module docstring)."""
    ints = translations._ints
    if bits == 8:
        codes = op.Cast(qweight, to=INT64)
    else:
        b = op.Cast(op.Reshape(qweight, ints([0, -1, 3])), to=UINT32)  # [N, Kp / 4, 3]
        parts = [op.Slice(b, ints([i]), ints([i + 1]), ints([-1])) for i in range(3)]
        word = op.BitwiseOr(op.BitwiseOr(parts[0], op.BitShift(parts[1], op.Constant(value=_uint32(8)),
                                                               direction="LEFT")),
                            op.BitShift(parts[2], op.Constant(value=_uint32(16)), direction="LEFT"))  # fmt: skip
        mask = op.Constant(value=_uint32(63))
        fields = [op.BitwiseAnd(op.BitShift(word, op.Constant(value=_uint32(6 * i)), direction="RIGHT"), mask)
                  for i in range(4)]  # fmt: skip
        codes = op.Cast(op.Reshape(op.Concat(*fields, axis=-1), ints([0, -1])), to=INT64)  # [N, Kp]
    values = op.Gather(levels, codes)
    groups = op.Shape(scales, start=1, end=2)
    values = op.Reshape(values, op.Concat(ints([0]), groups, ints([GROUP]), axis=0))
    w = op.Reshape(op.Mul(values, op.Unsqueeze(scales, ints([-1]))), ints([0, -1]))
    w = op.Slice(w, ints([0]), ints([in_features]), ints([1]))
    y = op.MatMul(x, op.Transpose(w, perm=[1, 0]))
    return y if bias is None else op.Add(y, bias)


def _uint32(value: int):
    import onnx

    return onnx.helper.make_tensor("value", onnx.TensorProto.UINT32, [], [value])


translations.TRANSLATION_TABLE.setdefault(torch.ops.qcompile_onnx.mx_lookup_matmul.default, translate)


def lower(site, scheme, packed, in_features, options) -> Lowering:
    """The lookup form of the module docstring; an :class:`OnnxExportError` naming the layer for activation forms."""
    if scheme.activations:
        weight_only = scheme.name.removesuffix(scheme.suffix())
        raise OnnxExportError(
            f"layer {site}: {scheme.name} ({scheme.family} activations quantized at run time) has no ONNX export yet; "
            f"re-plan this layer as {weight_only} (weight-only) to export it."
        )
    fmt = scheme.fmt
    tensors = {
        "qweight": packed.qweight.contiguous().view(torch.uint8),
        "scales": e8m0_decode(packed.scales).contiguous(),
        "levels": torch.tensor(fmt.values, dtype=torch.float32),
    }  # fmt: skip
    return Lowering(torch.ops.qcompile_onnx.mx_lookup_matmul.default, tensors, (in_features, fmt.bits),
                    f"Gather({scheme.element})+MatMul")  # fmt: skip
