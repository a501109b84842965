"""Every scheme's ONNX form, checked without onnxruntime: the export-only op, run eagerly on the
ONNX-layout tensors, against the scheme's own reference matmul; and the clear errors."""

from __future__ import annotations

import pytest
import torch

from qcompile.onnx.base import ExportOptions, OnnxExportError
from qcompile.onnx.families import lower_site
from qcompile.onnx.families.integer import matmul_nbits_block
from qcompile.schemes import parse_scheme

CASES = [
    ("int8", "matmulnbits"), ("int8-g32", "qdq"), ("int8-asym", "qdq"), ("int4-g32", "matmulnbits"),
    ("int4-g32", "qdq"), ("int4-g32-sym", "matmulnbits"), ("int4-g32-sym", "qdq"), ("int4-g128", "matmulnbits"),
    ("int4-g128", "qdq"), ("int4", "qdq"), ("int4-g96", "matmulnbits"), ("int2-g64", "matmulnbits"),
    ("int2-g32-sym", "qdq"), ("w8a8", "matmulnbits"), ("fp8", "matmulnbits"), ("nf4-g64", "qdq"),
]  # fmt: skip


@pytest.mark.parametrize("scheme_name,int4_format", CASES)
@pytest.mark.parametrize("k", [80, 160])
def test_onnx_layout_matches_reference(scheme_name, int4_format, k):
    torch.manual_seed(0)
    scheme = parse_scheme(scheme_name)
    weight = torch.randn(24, k)
    packed = scheme.pack(scheme.quantize(weight))
    lowering = lower_site("layer", scheme, packed, k, ExportOptions(int4_format))
    x, bias = torch.randn(3, 5, k), torch.randn(24)
    got = lowering.op(x, *lowering.tensors.values(), bias, *lowering.attrs)
    expected = scheme.reference_linear(x, packed.list(), bias, 24)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert lowering.tensors.get("qweight", lowering.tensors.get("B")).dtype != torch.float32


def test_matmulnbits_blocks():
    blocks = [matmul_nbits_block(g) for g in (16, 32, 96, 128, 256, 576, 40, 8)]
    assert blocks == [16, 32, 32, 128, 128, 64, None, None]


def _lower(name, k=64, int4_format="matmulnbits"):
    scheme = parse_scheme(name)
    packed = scheme.pack(scheme.quantize(torch.randn(8, k)))
    return lower_site("model.layers.3.mlp.up_proj", scheme, packed, k, ExportOptions(int4_format))


@pytest.mark.parametrize(
    "name,k,int4_format,words",
    [
        ("int3-g64", 64, "matmulnbits", ["model.layers.3.mlp.up_proj", "int3-g64", "int4-g64"]),
        ("fp8-w8a8", 64, "matmulnbits", ["model.layers.3.mlp.up_proj", "fp8-w8a8", "w8a8"]),
        ("int4", 40, "matmulnbits", ["groups of 40", "int4_format='qdq'"]),
        ("int2-g24", 48, "qdq", ["groups of 24", "multiple of 16"]),
    ],
)  # fmt: skip
def test_clear_errors(name, k, int4_format, words):
    with pytest.raises(OnnxExportError) as error:
        _lower(name, k, int4_format)
    for word in words:
        assert word in str(error.value)


def test_unknown_int4_format():
    with pytest.raises(OnnxExportError, match="int4_format"):
        ExportOptions("gguf")
