"""Export-only ops: one ``qcompile_onnx::*`` op per ONNX form a quantized matmul takes in the file.

Before export, :mod:`qcompile.onnx.prepare` rewrites every ``qcompile::linear`` call into one of these ops,
with its tensors already in the exact ONNX layout; :mod:`qcompile.onnx.translations` maps each op to its
ONNX nodes, one to one. The eager implementations below follow the ONNX operator definitions in plain
PyTorch, so a prepared graph can be checked against qcompile's reference without onnxruntime.

* ``matmul_nbits(x, B, scales, zero_points?, bias?, K, N, bits, block_size)``: ``B uint8 [N, blocks,
  block_size*bits/8]``, ``scales``/``zero_points`` float ``[N*blocks]`` → ``com.microsoft::MatMulNBits`` (+ ``Add``).
* ``dequantize_matmul(x, qweight, scales, zero_point?, offset?, bias?, axis, block_size, rows, in_features,
  out_features, packed4)``: ``qweight [rows, N]`` (int8, float8, or 4-bit codes packed flat), ``offset f32
  [G, 1, N]`` → ``DequantizeLinear`` (- offset per group) + ``MatMul`` (+ ``Add``).
* ``w8a8_matmul(x, qweight, scales, bias?)``: ``qweight int8 [K, N]``, ``scales f32 [N]`` → per-token int8
  quantization + ``MatMulInteger``.
* ``lookup_matmul(x, qweight, scales, levels, bias?, in_features)``: ``qweight uint8 [N, K_padded/2]``, ``scales
  f32 [N, G]``, ``levels f32 [16]`` → nibble split + ``Gather`` + ``MatMul``.
"""

from __future__ import annotations

import torch

from qcompile.schemes.packing import unpack_codes
from qcompile.schemes.w8a8 import quantize_per_token_int8


def _finish(y: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


def _empty(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("qcompile_onnx::matmul_nbits", mutates_args=())
def matmul_nbits(
    x: torch.Tensor, B: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
    bias: torch.Tensor | None, K: int, N: int, bits: int, block_size: int,
) -> torch.Tensor:  # fmt: skip
    """``x @ ((u - zero_points) * scales).T``; ``u`` packed low bits first along K (MatMulNBits)."""
    blocks = B.shape[1]
    codes = unpack_codes(B.reshape(N, -1), bits, blocks * block_size) if bits < 8 else B.reshape(N, -1)
    zp = zero_points if zero_points is not None else torch.full_like(scales, 2.0 ** (bits - 1))
    w = (codes.float().reshape(N, blocks, block_size) - zp.reshape(N, blocks, 1)) * scales.reshape(N, blocks, 1)
    return _finish(x.float() @ w.reshape(N, -1)[:, :K].t(), bias, x)


@matmul_nbits.register_fake
def _(x, B, scales, zero_points, bias, K, N, bits, block_size):
    return _empty(x, N)


def _unpack4(flat: torch.Tensor, rows: int, n: int, signed: bool) -> torch.Tensor:
    count = rows * n
    codes = unpack_codes(flat.reshape(1, -1), 4, flat.numel() * 2)[0, :count].to(torch.int16)
    if signed:
        codes = torch.where(codes > 7, codes - 16, codes)
    return codes.reshape(rows, n)


@torch.library.custom_op("qcompile_onnx::dequantize_matmul", mutates_args=())
def dequantize_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zero_point: torch.Tensor | None,
    offset: torch.Tensor | None, bias: torch.Tensor | None, axis: int, block_size: int, rows: int,
    in_features: int, out_features: int, packed4: int,
) -> torch.Tensor:  # fmt: skip
    """``DequantizeLinear(qweight, scales, zero_point, axis, block_size)`` ``[rows, N]``, minus ``offset``
    per group, first ``in_features`` rows, then ``x @ w``. ``packed4``: 0 none, 1 uint4, 2 int4 codes."""
    n = out_features
    q = _unpack4(qweight, rows, n, packed4 == 2) if packed4 else qweight
    q = q.to(torch.float32)
    if zero_point is not None:
        zp = zero_point.to(torch.float32)
        q = q - (zp.repeat_interleave(block_size, 0)[:rows] if block_size else zp)
    s = scales.repeat_interleave(block_size, 0)[:rows] if block_size else scales
    w = q * s
    if offset is not None:
        groups = offset.shape[0]
        w = (w.reshape(groups, rows // groups, n) - offset).reshape(rows, n)
    return _finish(x.float() @ w[:in_features], bias, x)


@dequantize_matmul.register_fake
def _(x, qweight, scales, zero_point, offset, bias, axis, block_size, rows, in_features, out_features, packed4):
    return _empty(x, out_features)


@torch.library.custom_op("qcompile_onnx::w8a8_matmul", mutates_args=())
def w8a8_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Symmetric per-token int8 activations × int8 weights ``[K, N]``, exact int32 accumulation."""
    lead = x.shape[:-1]
    x_q, x_scale = quantize_per_token_int8(x.reshape(-1, x.shape[-1]))
    acc = (x_q.to(torch.int64) @ qweight.to(torch.int64)).to(torch.float32)
    return _finish((acc * x_scale * scales).reshape(*lead, -1), bias, x)


@w8a8_matmul.register_fake
def _(x, qweight, scales, bias):
    return _empty(x, qweight.shape[1])


@torch.library.custom_op("qcompile_onnx::lookup_matmul", mutates_args=())
def lookup_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, levels: torch.Tensor, bias: torch.Tensor | None,
    in_features: int,
) -> torch.Tensor:  # fmt: skip
    """4-bit indices into ``levels`` (low nibble first), times a scale per group of K, then ``x @ w.T``."""
    n, groups = scales.shape
    codes = unpack_codes(qweight, 4, qweight.shape[1] * 2).long()
    w = (levels[codes].reshape(n, groups, -1) * scales.unsqueeze(-1)).reshape(n, -1)[:, :in_features]
    return _finish(x.float() @ w.t(), bias, x)


@lookup_matmul.register_fake
def _(x, qweight, scales, levels, bias, in_features):
    return _empty(x, scales.shape[0])


EXPORT_OPS = (
    torch.ops.qcompile_onnx.matmul_nbits.default,
    torch.ops.qcompile_onnx.dequantize_matmul.default,
    torch.ops.qcompile_onnx.w8a8_matmul.default,
    torch.ops.qcompile_onnx.lookup_matmul.default,
)
