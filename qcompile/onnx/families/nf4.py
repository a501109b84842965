"""``nf4-gN`` (4-bit NormalFloat) in ONNX: a table lookup, since no ONNX operator knows the NF4 levels.

The packed codes stay as qcompile stores them (``uint8 [N, K_padded/2]``, element ``2j`` in the low nibble);
the graph splits the nibbles (``BitwiseAnd``, ``BitShift``), looks each code up in the 16 levels (``Gather``),
multiplies by the group's absmax scale and runs ``MatMul``. Every input of that dequantization is an
initializer, so onnxruntime folds it once when the session starts: the file keeps 4 bits per weight,
memory at run time holds float weights.
"""

from __future__ import annotations

import torch

from qcompile.onnx.base import Lowering
from qcompile.schemes.nf4 import NF4_LEVELS


def lower(site, scheme, packed, in_features, options):
    tensors = {
        "qweight": packed.qweight.contiguous(), "scales": packed.scales.contiguous(),
        "levels": torch.tensor(NF4_LEVELS, dtype=torch.float32),
    }  # fmt: skip
    return Lowering(torch.ops.qcompile_onnx.lookup_matmul.default, tensors, (in_features,), "Gather(nf4)+MatMul")
