"""Integer weight-only schemes (``int8``, ``int4-g128``, ``int2-g64`` …) in ONNX.

qcompile stores unsigned codes ``u`` with a *float* zero point: ``w = (u - z) * s`` (symmetric: ``z = 2**(bits-1)``;
8 bits: signed codes ``q = u - 128``). The forms below keep those numerics exactly:

* ``MatMulNBits`` (2 and 4 bits): ``B uint8 [N, blocks, block_size*bits/8]`` holds the codes low bits first
  along K, which is qcompile's own packing; ``scales`` and ``zero_points`` are float ``[N * blocks]``
  (onnxruntime takes float zero points in the scales' type, so ``z`` is not rounded). A block is a power of
  two in [16, 128]: a larger or non power-of-two group is cut into blocks that repeat its scale and zero.
  Symmetric schemes give no zero points (MatMulNBits then uses ``2**(bits-1)``).
* ``DequantizeLinear`` (8 bits; 4 bits with ``int4_format="qdq"``): the weight is stored transposed
  ``[K, N]`` so ``MatMul`` reads it directly; scales are ``[N]`` (per channel, ``axis=1``) or
  ``[K/group, N]`` (``axis=0``, ``block_size=group``). Symmetric codes are signed (``int8``/``int4``) with no
  zero point. A float zero point has no integer type, so asymmetric weights dequantize without it and
  subtract ``offset = z * s`` per group (``[groups, 1, N]``): ``w = u*s - z*s``.
"""

from __future__ import annotations

import torch

from qcompile.onnx.base import ExportOptions, Lowering, OnnxExportError
from qcompile.schemes import IntWeightOnly, PackedWeight
from qcompile.schemes.packing import pack_codes

OPS = torch.ops.qcompile_onnx
MATMULNBITS_BITS = (2, 4)
MAX_BLOCK = 128


def lower(site: str, scheme: IntWeightOnly, packed: PackedWeight, in_features: int, options: ExportOptions):
    if scheme.bits == 3:
        raise OnnxExportError(
            f"layer {site}: {scheme.name} cannot be exported to ONNX: MatMulNBits takes 2, 4 or 8 bits and ONNX "
            f"has no 3-bit type. Re-plan this layer as int4-g{scheme.group_size or 128} or int2-g…"
        )
    q = scheme.unpack(packed, in_features)
    if scheme.bits == 8 or (scheme.bits == 4 and options.int4_format == "qdq"):
        return _dequantize(site, scheme, q, in_features)
    return _matmul_nbits(site, scheme, q, in_features, options)


def matmul_nbits_block(group: int) -> int | None:
    """Largest power of two in [16, 128] that divides ``group`` (``None`` when there is none)."""
    block = MAX_BLOCK
    while block >= 16:
        if group % block == 0:
            return block
        block //= 2
    return None


def _matmul_nbits(site, scheme, q, in_features, options):
    group = scheme.group_size_for(in_features)
    block = matmul_nbits_block(group)
    if block is None:
        hint = "use int4_format='qdq' or " if scheme.bits == 4 else ""
        raise OnnxExportError(
            f"layer {site}: {scheme.name} has groups of {group} weights, but MatMulNBits blocks are powers of two "
            f">= 16 that must divide the group; {hint}re-plan with a group size that is a multiple of 16."
        )
    n = q.out_features
    blocks = -(-in_features // block)
    repeat = group // block
    codes = q.codes[:, : blocks * block]
    B = pack_codes(codes, scheme.bits).reshape(n, blocks, block * scheme.bits // 8)
    scales = q.scales.repeat_interleave(repeat, 1)[:, :blocks].reshape(-1).contiguous()
    zeros = None if q.zeros is None else q.zeros.repeat_interleave(repeat, 1)[:, :blocks].reshape(-1).contiguous()
    return Lowering(
        OPS.matmul_nbits.default, {"B": B.contiguous(), "scales": scales, "zero_points": zeros},
        (in_features, n, scheme.bits, block), "MatMulNBits",
    )  # fmt: skip


def _dequantize(site, scheme, q, in_features):
    n, k_padded = q.codes.shape
    per_channel = scheme.group_size is None
    group = scheme.group_size_for(in_features)
    symmetric = q.zeros is None
    rows = in_features if symmetric else k_padded  # the offset needs whole groups
    if scheme.bits == 8:
        codes = q.codes  # int8, signed
    else:
        codes = q.codes.to(torch.int16) - (8 if symmetric else 0)
    weight_t = codes[:, :rows].t().contiguous()  # [rows, N]
    scales = q.scales.reshape(-1) if per_channel else q.scales.t().contiguous()  # [N] or [groups, N]
    offset = None if symmetric else (q.zeros * q.scales).t().unsqueeze(1).contiguous()  # [groups, 1, N]
    lowering = Lowering(
        OPS.dequantize_matmul.default, {"qweight": weight_t, "scales": scales, "zero_point": None, "offset": offset},
        (), "DequantizeLinear+MatMul",
    )  # fmt: skip
    packed4 = 0
    if scheme.bits == 4:
        packed4 = 2 if symmetric else 1
        flat = (weight_t.reshape(-1) & 0xF).to(torch.uint8)
        if flat.numel() % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        lowering.tensors["qweight"] = pack_codes(flat.reshape(1, -1), 4).reshape(-1)
        lowering.onnx_types["qweight"] = "int4" if symmetric else "uint4"
        lowering.onnx_shapes["qweight"] = (rows, n)
    axis, block_size = (1, 0) if per_channel else (0, group)
    lowering.attrs = (axis, block_size, rows, in_features, n, packed4)
    return lowering
