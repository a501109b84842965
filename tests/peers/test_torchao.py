"""torchao 0.18 on CPU against the ``torchao`` family (``qcompile/schemes/torchao.py``), the real package imported.

Each config runs through ``torchao.quantization.quantize_`` on ``Sequential(Linear)``; qcompile quantizes the same
weights with the matching scheme and runs its op (C++ kernel for float32 / bfloat16 activations, reference for
float16). What is compared, per config:

* codes and scales: equal to torchao's stored tensors (``torch.equal``);
* outputs: ``int8-a8`` bit for bit (same integer sums, same roundings in the same order); weight-only forms within
  two steps of the output dtype at ``max|y|`` (``2**-7`` bfloat16, ``2**-10`` float16, ``2**-22`` float32): torchao
  multiplies differently (int8: ``x @ q`` then ``* scale``; int4: the tinygemm CPU kernel), the weights being equal.

``Float8DynamicActivationFloat8WeightConfig`` refuses CPU in 0.18 (it needs compute capability 8.9): its weight and
activation quantization are compared through torchao's primitives (``_choose_scale_float8``,
``_quantize_affine_float8``) and its matmul through float64 math on torchao's dequantized tensors.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import qcompile  # noqa: F401  (registers torch.ops.qcompile.linear)
from qcompile.schemes import parse_scheme

DTYPES = {"": torch.bfloat16, "-fp16": torch.float16, "-fp32": torch.float32}
STEP = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 2**-22}
N, K = 48, 256


def _layer(dtype, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(K, N).to(dtype)


def _quantized(lin, config):
    from torchao.quantization import quantize_

    model = torch.nn.Sequential(copy.deepcopy(lin))
    quantize_(model, config)
    return model


def _ours(name, lin):
    scheme = parse_scheme(name)
    packed = scheme.pack(scheme.quantize(lin.weight.detach().float()))
    return scheme, packed


def _outputs(model, scheme, packed, lin, x):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float16 activations take the reference path (notice)
        expected = model(x)
        got = torch.ops.qcompile.linear(x, packed.list(), lin.bias.detach(), scheme.name, K, N)
    return got, expected


def _assert_within_steps(got, expected, steps=2):
    assert got.dtype == expected.dtype
    bound = steps * STEP[expected.dtype] * expected.float().abs().max()
    assert (got.float() - expected.float()).abs().max() <= bound


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("suffix", ["", "-fp16"])
def test_int4_weight_only_on_cpu(group, suffix):
    """``Int4WeightOnlyConfig``'s default packing (``plain``) needs mslk, absent on CPU; torchao's CPU int4 is
    ``PrototypeInt4WeightOnlyConfig`` (``Int4OpaqueTensor``, tinygemm qparams, ``_weight_int4pack_mm_for_cpu``).
    Its scale and zero point, and the codes of torchao's ``_quantize_affine_tinygemm``, equal the scheme's; the
    scheme's dequantized weight equals ``_dequantize_affine_tinygemm``; outputs within two steps."""
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
    from torchao.quantization.quant_primitives import (
        MappingType,
        _choose_qparams_affine_tinygemm,
        _dequantize_affine_tinygemm,
        _quantize_affine_tinygemm,
    )
    from torchao.quantization.utils import unpack_tinygemm_scales_and_zeros

    dtype = DTYPES[suffix]
    lin = _layer(dtype)
    model = _quantized(lin, PrototypeInt4WeightOnlyConfig(group_size=group))
    assert type(model[0].weight).__name__ == "Int4OpaqueTensor"
    scheme, packed = _ours(f"torchao-int4-g{group}{suffix}", lin)
    q = scheme.unpack(packed, K)
    scale, zero_point = (t.squeeze(-1) for t in unpack_tinygemm_scales_and_zeros(model[0].weight.scale_and_zero))
    assert torch.equal(q.scales, scale.float())
    assert torch.equal(((8 - q.zeros) * q.scales).to(dtype), zero_point)
    w, block = lin.weight.detach(), [1, group]
    s, z = _choose_qparams_affine_tinygemm(w, MappingType.ASYMMETRIC, block, torch.int32, 0, 15, 1e-6, None, dtype)
    codes = _quantize_affine_tinygemm(w, block, s, z, torch.int32, 0, 15)
    assert torch.equal(q.codes.to(torch.int32), codes)
    dequantized = _dequantize_affine_tinygemm(codes, block, s, z, torch.int32, 0, 15, output_dtype=dtype)
    assert torch.equal(scheme.dequantize_as(q, dtype), dequantized)
    _assert_within_steps(*_outputs(model, scheme, packed, lin, torch.randn(3, K, dtype=dtype)))


@pytest.mark.parametrize("suffix", DTYPES)
def test_int8_weight_only(suffix):
    """``Int8WeightOnlyConfig()`` (PerRow): ``absmax / 127.5`` in the model dtype, ``round(w * (1 / scale))`` in
    [-128, 127]: codes and float32 scales equal; outputs within two steps."""
    from torchao.quantization import Int8WeightOnlyConfig

    dtype = DTYPES[suffix]
    lin = _layer(dtype)
    model = _quantized(lin, Int8WeightOnlyConfig())
    scheme, packed = _ours(f"torchao-int8{suffix}", lin)
    assert torch.equal(packed.qweight, model[0].weight.qdata)
    assert torch.equal(packed.scales, model[0].weight.scale.reshape(N, 1))
    assert torch.equal(scheme.dequantize_as(scheme.unpack(packed, K), dtype), model[0].weight.dequantize())
    _assert_within_steps(*_outputs(model, scheme, packed, lin, torch.randn(3, K, dtype=dtype)))


@pytest.mark.parametrize("suffix", DTYPES)
def test_int8_dynamic_activation_bit_exact(suffix):
    """``Int8DynamicActivationInt8WeightConfig()``: equal codes and scales, and outputs equal bit for bit (3-D
    activations with a bias; an all-zero token, whose scale torchao clamps to float32 eps)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    dtype = DTYPES[suffix]
    lin = _layer(dtype)
    model = _quantized(lin, Int8DynamicActivationInt8WeightConfig())
    scheme, packed = _ours(f"torchao-int8-a8{suffix}", lin)
    assert torch.equal(packed.qweight, model[0].weight.qdata)
    assert torch.equal(packed.scales, model[0].weight.scale.reshape(N, 1))
    x = torch.randn(2, 5, K, dtype=dtype)
    x[0, 1] = 0
    got, expected = _outputs(model, scheme, packed, lin, x)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("suffix", DTYPES)
def test_float8_weight_only(suffix):
    """``Float8WeightOnlyConfig()`` (PerRow): ``scale = absmax / 448`` in the model dtype, e4m3 of the float32
    quotient: codes (bytes) and scales equal; outputs within two steps."""
    from torchao.quantization import Float8WeightOnlyConfig

    dtype = DTYPES[suffix]
    lin = _layer(dtype)
    model = _quantized(lin, Float8WeightOnlyConfig())
    scheme, packed = _ours(f"torchao-fp8{suffix}", lin)
    assert torch.equal(packed.qweight.view(torch.uint8), model[0].weight.qdata.view(torch.uint8))
    assert torch.equal(packed.scales, model[0].weight.scale.reshape(N, 1))
    _assert_within_steps(*_outputs(model, scheme, packed, lin, torch.randn(3, K, dtype=dtype)))


@pytest.mark.parametrize("suffix", DTYPES)
def test_float8_dynamic_activation_through_primitives(suffix):
    """The config refuses CPU; torchao's primitives quantize the weight per row and the activation per token: the
    scheme's packed weight and its activation quantization (``fp8_rows``) equal them, and the scheme's reference
    output equals float64 ``(x_q * x_scale) @ (q * scale).T + bias`` on torchao's tensors within float32 rounding
    (``2**-22`` relative to ``max|y|``) before the cast to the model dtype (then one output step)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    from torchao.quantization.quant_primitives import _choose_scale_float8, _quantize_affine_float8

    from qcompile.schemes.torchao import fp8_rows

    dtype = DTYPES[suffix]
    lin = _layer(dtype)
    with pytest.raises(AssertionError, match="compute capability"):
        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        quantize_(torch.nn.Sequential(copy.deepcopy(lin)), config)
    w, x = lin.weight.detach(), torch.randn(4, K, dtype=dtype)
    w_scale = _choose_scale_float8(w, [1, K], torch.float8_e4m3fn)
    w_q = _quantize_affine_float8(w, w_scale, torch.float8_e4m3fn)
    x_scale = _choose_scale_float8(x, [1, K], torch.float8_e4m3fn)
    x_q = _quantize_affine_float8(x, x_scale, torch.float8_e4m3fn)
    scheme, packed = _ours(f"torchao-fp8-a8{suffix}", lin)
    assert torch.equal(packed.qweight.view(torch.uint8), w_q.view(torch.uint8))
    assert torch.equal(packed.scales, w_scale.reshape(N, 1))
    ours_q, ours_scale = fp8_rows(x)
    assert torch.equal(ours_q.view(torch.uint8), x_q.view(torch.uint8)) and torch.equal(ours_scale, x_scale)
    expected = (x_q.double() * x_scale.double()) @ (w_q.double() * w_scale.double()).t() + lin.bias.double()
    got = scheme.reference_linear(x, packed.list(), lin.bias.detach(), N)
    bound = 2**-22 * expected.abs().max() + STEP[dtype] * expected.abs().max()
    assert (got.double() - expected).abs().max() <= bound


def test_float32_fp8_is_qcompiles_fp8():
    """For a float32 model torchao's float8 weights are ``fp8``'s bytes, and its dynamic float8 activations are
    ``fp8-w8a8``'s numbers (both: float32 ``absmax / 448``, e4m3 of the float32 quotient; the rows' kernels serve
    ``torchao-fp8-a8`` float32 calls for that reason)."""
    lin = _layer(torch.float32)
    fp8, ours = parse_scheme("fp8"), parse_scheme("torchao-fp8-fp32")
    a = fp8.pack(fp8.quantize(lin.weight.detach()))
    b = ours.pack(ours.quantize(lin.weight.detach()))
    assert torch.equal(a.qweight.view(torch.uint8), b.qweight.view(torch.uint8)) and torch.equal(a.scales, b.scales)
    x = torch.randn(5, K)
    a8 = parse_scheme("torchao-fp8-a8-fp32")
    assert a8.kernel_layout(torch.float32) == parse_scheme("fp8-w8a8")
    assert a8.kernel_layout(torch.bfloat16) is None
    expected = parse_scheme("fp8-w8a8").reference_linear(x, a.list(), lin.bias.detach(), N)
    assert torch.equal(a8.reference_linear(x, b.list(), lin.bias.detach(), N), expected)


def test_int8_is_not_qcompiles_int8():
    """torchao's int8 scale is ``absmax / 127.5`` (``int8``'s ``absmax / 127``) and its codes ``round(w * (1 /
    scale))`` (a float32 reciprocal): on the same weights the scales differ by 127 / 127.5 and most codes of
    ``|w|`` near ``absmax`` differ."""
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    ours, int8 = parse_scheme("torchao-int8-fp32").quantize(w), parse_scheme("int8").quantize(w)
    absmax = w.abs().amax(1, keepdim=True)
    assert torch.equal(ours.scales, absmax / 127.5) and torch.equal(int8.scales, absmax / 127)
    expected = torch.clamp(torch.round(w * (1.0 / ours.scales)), -128, 127)
    assert torch.equal(ours.codes.float(), expected)
    assert not torch.equal(ours.codes, int8.codes)
