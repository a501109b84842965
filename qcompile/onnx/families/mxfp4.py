"""``mxfp4`` (and, through :func:`lower_fp4`, ``nvfp4``) in ONNX: E2M1 codes looked up in their 16 values.

No ONNX operator reads E2M1 with these scales, so the form is that of ``nf4``: the packed codes stay as qcompile
stores them (``uint8 [N, Kp/2]``, element ``2j`` in the low nibble), the graph splits the nibbles, ``Gather``s the
16 E2M1 values, multiplies by each group's unit (``float32 [N, Kp/group]``: ``2**(s - 127)`` for mxfp4, ``e4m3 *
global_scale`` for nvfp4, the float32 values the reference uses) and runs ``MatMul``. The unit table is float32
rather than the stored byte per group, so the file holds 4 + 32/group bits per weight.

With a Hadamard rotation (``-had``) the activation is zero-padded to ``Kp``, reshaped to ``[..., Kp/h, h]`` and
multiplied by the constant ``H [h, h]`` before that ``MatMul`` (op ``qcompile_onnx::fp4_rotated_lookup_matmul``,
defined here with its translation, which this module adds to the exporter's table when it is imported, as the
lowering of any such site does first). ``-w4a4`` forms (activations quantized at run time) have no ONNX form yet:
a clear error naming the layer.
"""

from __future__ import annotations

import torch
from onnxscript import opset21 as op

from qcompile.onnx import translations
from qcompile.onnx.base import Lowering, OnnxExportError
from qcompile.schemes.fp4 import E2M1_VALUES, hadamard, unpack_e2m1


def _finish(y: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return (y if bias is None else y + bias).to(x.dtype)


@torch.library.custom_op("qcompile_onnx::fp4_rotated_lookup_matmul", mutates_args=())
def rotated_lookup_matmul(
    x: torch.Tensor, rotation: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, levels: torch.Tensor,
    bias: torch.Tensor | None, in_features: int, padded: int, size: int,
) -> torch.Tensor:  # fmt: skip
    """``x [..., in_features]`` zero-padded to ``padded`` (``Kp``), times ``rotation [size, size]`` per block of
    ``size``, then ``@ w.T``: ``w`` the 4-bit indices into ``levels`` (``qweight [N, Kp/2]``, low nibble first)
    times a unit per group of K (``scales [N, G]``)."""
    n, groups = scales.shape
    xp = torch.nn.functional.pad(x.float(), (0, padded - in_features))
    xr = (xp.reshape(*x.shape[:-1], padded // size, size) @ rotation).reshape(*x.shape[:-1], padded)
    w = levels[unpack_e2m1(qweight, padded).long()].reshape(n, groups, -1) * scales.unsqueeze(-1)
    return _finish(xr @ w.reshape(n, padded).t(), bias, x)


@rotated_lookup_matmul.register_fake
def _(x, rotation, qweight, scales, levels, bias, in_features, padded, size):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


def translate_rotated_lookup_matmul(x, rotation, qweight, scales, levels, bias, in_features: int, padded: int,
                                    size: int):  # fmt: skip
    """Pad, Reshape, MatMul by the constant rotation, Reshape back, then ``lookup_matmul``'s nodes over ``Kp``."""
    ints = translations._ints
    if padded != in_features:
        x = op.Pad(x, ints([0, padded - in_features]), op.Constant(value_float=0.0), ints([-1]))
    lead = op.Shape(x, start=0, end=-1)
    blocks = op.Reshape(x, op.Concat(lead, ints([padded // size, size]), axis=0))
    rotated = op.Reshape(op.MatMul(blocks, rotation), op.Concat(lead, ints([padded]), axis=0))
    return translations.lookup_matmul(rotated, qweight, scales, levels, bias, padded)


translations.TRANSLATION_TABLE[torch.ops.qcompile_onnx.fp4_rotated_lookup_matmul.default] = (
    translate_rotated_lookup_matmul
)


def lower_fp4(site, scheme, packed, in_features, options) -> Lowering:
    """The FP4 lowering for ``scheme`` (an ``mxfp4`` or ``nvfp4`` scheme): see the module docstring."""
    if scheme.activations:
        weight_only = scheme.name.replace("-w4a4", "")
        raise OnnxExportError(
            f"layer {site}: {scheme.name} (FP4 activations quantized at run time) has no ONNX export yet; re-plan "
            f"this layer as {weight_only} (weight-only) to export it."
        )
    units = scheme.scale_values(packed.scales, packed.get("global_scale")).contiguous()
    tensors = {"qweight": packed.qweight.contiguous(), "scales": units,
               "levels": torch.tensor(E2M1_VALUES, dtype=torch.float32)}  # fmt: skip
    if scheme.rotation is None:
        return Lowering(torch.ops.qcompile_onnx.lookup_matmul.default, tensors, (in_features,),
                        f"Gather({scheme.family})+MatMul")  # fmt: skip
    tensors = {"rotation": hadamard(scheme.rotation, torch.float32), **tensors}
    attrs = (in_features, scheme.padded_in_features(in_features), scheme.rotation)
    return Lowering(torch.ops.qcompile_onnx.fp4_rotated_lookup_matmul.default, tensors, attrs,
                    f"MatMul(Hadamard {scheme.rotation})+Gather({scheme.family})+MatMul")  # fmt: skip


def lower(site, scheme, packed, in_features, options):
    return lower_fp4(site, scheme, packed, in_features, options)
