"""``bnb4`` in ONNX (the table lookup with one scale per run of ``gcd(K, B)``): the export-only op on the re-laid
tensors against the scheme's reference, an onnxruntime run of an exported model against qcompile's reference; and
``llm-int8``'s clear error naming the layer."""

from __future__ import annotations

import math

import onnx
import pytest
import torch

import qcompile
import qcompile.onnx
from qcompile.onnx.base import ExportOptions, OnnxExportError
from qcompile.onnx.families import lower_site
from qcompile.schemes import parse_scheme

from conftest import Stack, assert_parity, op_counts


@pytest.mark.parametrize("name", ["bnb-nf4", "bnb-fp4-dq", "bnb-nf4-dq-b128", "bnb-fp4-b32"])
@pytest.mark.parametrize("k", [70, 96, 128, 45])
def test_onnx_layout_matches_reference(name, k):
    generator = torch.Generator().manual_seed(k)
    scheme = parse_scheme(name)
    packed = scheme.pack(scheme.quantize(torch.randn(24, k, generator=generator)))
    lowering = lower_site("layer", scheme, packed, k, ExportOptions())
    x, bias = torch.randn(3, 5, k, generator=generator), torch.randn(24, generator=generator)
    got = lowering.op(x, *lowering.tensors.values(), bias, *lowering.attrs)
    expected = scheme.reference_linear(x, packed.list(), bias, 24)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    runs = math.gcd(k, scheme.blocksize)  # 70: 2, 96: 32, 128: 64 or 128, 45: 1
    assert lowering.tensors["qweight"].dtype == torch.uint8 and lowering.tensors["qweight"].shape == (24, (k + 1) // 2)
    assert lowering.tensors["scales"].shape == (24, (k + k % 2) // runs)


def test_llm_int8_is_a_clear_error():
    scheme = parse_scheme("llm-int8")
    packed = scheme.pack(scheme.quantize(torch.randn(8, 64)))
    with pytest.raises(OnnxExportError) as error:
        lower_site("model.layers.3.mlp.up_proj", scheme, packed, 64, ExportOptions())
    for word in ("model.layers.3.mlp.up_proj", "llm-int8", "no ONNX translation"):
        assert word in str(error.value)


# (name, in, out, scheme): K ragged against the blocks, odd K, double quantization
LAYERS = [("l0", 70, 48, "bnb-nf4"), ("l1", 48, 45, "bnb-fp4-dq"), ("l2", 45, 56, "bnb-nf4-dq-b128")]


def test_exported_model_matches_the_reference_in_onnxruntime(tmp_path):
    torch.manual_seed(0)
    recipe = {"default": None, "overrides": [{"targets": [name], "scheme": scheme} for name, _, _, scheme in LAYERS]}
    program = qcompile.compile(Stack(LAYERS).eval(), (torch.randn(2, 5, 70),), recipe, progress_bar=False)
    path = tmp_path / "bnb4.onnx"
    report = qcompile.onnx.export(program, path=path)
    onnx.checker.check_model(str(path))
    assert report.max_abs_diff < 1e-3
    assert op_counts(path)["Gather"] == 3
    assert_parity(path, program, (torch.randn(4, 3, 70) * 2,))
