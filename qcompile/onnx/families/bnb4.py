"""``bnb4`` (bitsandbytes' 4-bit state, blocks over the flattened weight) in ONNX: the table lookup of ``nf4``
(``lookup_matmul``: nibble split, ``Gather`` of the 16 levels, a scale per group along K, ``MatMul``).

Blocks of ``B`` over the flattened ``[N, K]`` weight meet row boundaries at multiples of ``K``, and each other at
multiples of ``B``, so every run of ``g = gcd(K, B)`` elements of a row lies in one block: the export re-lays the
codes per row (element ``2j`` in the low nibble, rows padded to an even length) and writes one float32 scale per
``g`` elements, the block's absmax (double quantization undone in float32, as the reference does). ``K % B == 0``
gives ``g = B`` (the size of ``nf4-g<B>``); an odd ``K`` gives ``g = 1``, a float32 scale per weight.
"""

from __future__ import annotations

import math

import torch

from qcompile.onnx.base import Lowering, OnnxExportError
from qcompile.schemes import bnb_blockwise as blockwise
from qcompile.schemes.packing import pack_codes


def lower(site, scheme, packed, in_features, options):
    k = in_features
    if k == 1:
        raise OnnxExportError(f"layer {site}: {scheme.name} with in_features=1 does not say its out_features in its "
                              f"packed bytes; no ONNX form")  # fmt: skip
    q = scheme.unpack(packed, k)
    n = q.out_features
    group = math.gcd(k, scheme.blocksize)
    kp = k + k % 2
    codes = torch.nn.functional.pad(q.codes, (0, kp - k))
    columns = torch.arange(0, kp, group)  # first column of each run of g
    blocks = (torch.arange(n).unsqueeze(1) * k + columns) // scheme.blocksize  # [N, Kp / g]
    absmax = scheme.block_absmax(q)
    scales = torch.where(columns < k, absmax[blocks.clamp(max=absmax.numel() - 1)], torch.zeros(()))
    tensors = {"qweight": pack_codes(codes, 4).contiguous(), "scales": scales.to(torch.float32).contiguous(),
               "levels": blockwise.table(scheme.quant_type)}  # fmt: skip
    return Lowering(torch.ops.qcompile_onnx.lookup_matmul.default, tensors, (in_features,),
                    f"Gather({scheme.name})+MatMul")  # fmt: skip
