"""``higgs-<b>[-p1][-h<h>]`` in ONNX (opset 21): the packed codes and float16 scales stay as qcompile stores them, the
grid is a small float32 initializer, and the rotation is two small constant MatMuls.

Weight (every input an initializer, so onnxruntime folds it once when the session starts; the file keeps
``b + 16/g`` bits per weight plus the grid)::

    word  = bytes of each packing unit as an integer (1 byte, or 3 little-endian bytes for 3- and 6-bit codes)
    codes = (word / 2**(c*i)) mod 2**c  for the unit's codes i        (Div, Mod on int64: the layout of
                                                                      ``qcompile.schemes.higgs``)
    Wr    = Gather(grid [2**c, p], codes) reshaped [N, Kp / g, g] * Cast<float>(scales)[..., None], then [N, Kp]

Activation: zero-padded to ``Kp``, each block of ``h`` reshaped to ``[a, b]`` (``a * b = h``, ``a <= b`` powers of
two) and rotated as ``H_a @ X @ H_b``: the Sylvester Hadamard of size ``h`` is the Kronecker product ``H_a ⊗ H_b``,
and a row vector times ``A ⊗ B`` is ``A.T @ X @ B`` on its ``[a, b]`` reshape (both factors symmetric). Constants:
``a² + b²`` floats (1280 for ``h = 512``) instead of ``h²``. Then ``y = MatMul(xr, Transpose(Wr)) (+ bias)``.

The op ``qcompile_onnx::higgs_matmul`` (this form in plain PyTorch) and its translation are defined here and added to
:data:`qcompile.onnx.translations.TRANSLATION_TABLE` on import.
"""

from __future__ import annotations

import torch
from onnxscript import opset21 as op

from qcompile.onnx import translations
from qcompile.onnx.base import Lowering
from qcompile.schemes.fp4 import hadamard

INT64 = 7
FLOAT = 1


def factors(h: int) -> tuple[int, int]:
    """``(a, b)`` with ``a * b = h``, powers of two, ``a <= b`` and ``b <= 2 a``."""
    a = 1 << ((h.bit_length() - 1) // 2)
    return a, h // a


def unit(code_bits: int) -> tuple[int, int]:
    """``(bytes, codes)`` of one packing unit of ``code_bits``-bit codes."""
    return (3, 24 // code_bits) if code_bits in (3, 6) else (1, 8 // code_bits)


def _codes(qweight: torch.Tensor, code_bits: int) -> torch.Tensor:
    """int64 ``[N, V]`` codes from ``qweight uint8 [N, bytes]`` (the graph's integer arithmetic)."""
    n = qweight.shape[0]
    nbytes, per = unit(code_bits)
    units = qweight.to(torch.int64).reshape(n, -1, nbytes)
    word = (units * (256 ** torch.arange(nbytes, dtype=torch.int64))).sum(-1, keepdim=True)
    shifts = 2 ** (code_bits * torch.arange(per, dtype=torch.int64))
    return torch.remainder(torch.div(word, shifts, rounding_mode="floor"), 2**code_bits).reshape(n, -1)


@torch.library.custom_op("qcompile_onnx::higgs_matmul", mutates_args=())
def higgs_matmul(
    x: torch.Tensor, hadamard_a: torch.Tensor, hadamard_b: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
    grid: torch.Tensor, bias: torch.Tensor | None, in_features: int, padded: int, size: int, code_bits: int,
) -> torch.Tensor:  # fmt: skip
    """``x [..., in_features]`` zero-padded to ``padded``, each block of ``size`` rotated as ``H_a @ X @ H_b``, times
    ``Wr.T`` (``Wr`` decoded from ``qweight``, ``scales``, ``grid [2**code_bits, p]``) plus ``bias``."""
    n, groups = scales.shape
    a, b = hadamard_a.shape[0], hadamard_b.shape[0]
    lead = x.shape[:-1]
    xp = torch.nn.functional.pad(x.float(), (0, padded - in_features))
    xr = (hadamard_a @ (xp.reshape(*lead, padded // size, a, b) @ hadamard_b)).reshape(*lead, padded)
    values = grid[_codes(qweight, code_bits)].reshape(n, groups, -1)
    w = (values * scales.float().unsqueeze(-1)).reshape(n, padded)
    y = xr @ w.t()
    return (y if bias is None else y + bias).to(x.dtype)


@higgs_matmul.register_fake
def _(x, hadamard_a, hadamard_b, qweight, scales, grid, bias, in_features, padded, size, code_bits):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


def _ints(values):
    return op.Constant(value_ints=list(values))


def translate(x, hadamard_a, hadamard_b, qweight, scales, grid, bias, in_features: int, padded: int, size: int,
              code_bits: int):  # fmt: skip
    """The ONNX nodes of ``qcompile_onnx::higgs_matmul`` (see the module docstring)."""
    a, b = factors(size)
    nbytes, per = unit(code_bits)
    units = op.Reshape(op.Cast(qweight, to=INT64), _ints([0, -1, nbytes]))
    word = op.ReduceSum(op.Mul(units, _ints([256**i for i in range(nbytes)])), _ints([-1]), keepdims=1)
    codes = op.Mod(op.Div(word, _ints([2 ** (code_bits * i) for i in range(per)])), _ints([2**code_bits]))
    values = op.Gather(grid, op.Reshape(codes, _ints([0, -1])))  # [N, V, p]
    groups = op.Shape(scales, start=1, end=2)
    values = op.Reshape(values, op.Concat(_ints([0]), groups, _ints([-1]), axis=0))
    w = op.Reshape(op.Mul(values, op.Unsqueeze(op.Cast(scales, to=FLOAT), _ints([-1]))), _ints([0, padded]))
    if padded != in_features:
        x = op.Pad(x, _ints([0, padded - in_features]), op.Constant(value_float=0.0), _ints([-1]))
    lead = op.Shape(x, start=0, end=-1)
    blocks = op.Reshape(x, op.Concat(lead, _ints([padded // size, a, b]), axis=0))
    rotated = op.MatMul(hadamard_a, op.MatMul(blocks, hadamard_b))
    y = op.MatMul(op.Reshape(rotated, op.Concat(lead, _ints([padded]), axis=0)), op.Transpose(w, perm=[1, 0]))
    return y if bias is None else op.Add(y, bias)


translations.TRANSLATION_TABLE.setdefault(torch.ops.qcompile_onnx.higgs_matmul.default, translate)


def lower(site, scheme, packed, in_features, options) -> Lowering:
    a, b = factors(scheme.hadamard)
    tensors = {
        "hadamard_a": hadamard(a, torch.float32), "hadamard_b": hadamard(b, torch.float32),
        "qweight": packed.qweight.contiguous(), "scales": packed.scales.contiguous(), "grid": scheme.grid(),
    }  # fmt: skip
    attrs = (in_features, scheme.padded_in_features(in_features), scheme.hadamard, scheme.code_bits)
    return Lowering(torch.ops.qcompile_onnx.higgs_matmul.default, tensors, attrs,
                    f"MatMul(Hadamard {a}x{b})+Gather(higgs grid)+MatMul")  # fmt: skip
