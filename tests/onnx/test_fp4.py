"""``mxfp4`` and ``nvfp4`` in ONNX: the export-only op against the schemes' reference, the w4a4 error, and an
onnxruntime run of an exported model against qcompile's reference."""

from __future__ import annotations

import onnx
import pytest
import torch

import qcompile
import qcompile.onnx
from qcompile.onnx.base import ExportOptions, OnnxExportError
from qcompile.onnx.families import lower_site
from qcompile.schemes import parse_scheme

from conftest import Stack, assert_parity, op_counts

WEIGHT_ONLY = ["mxfp4", "mxfp4-had", "mxfp4-had128", "nvfp4", "nvfp4-had", "nvfp4-had64"]


@pytest.mark.parametrize("name", WEIGHT_ONLY)
@pytest.mark.parametrize("k", [70, 200])
def test_onnx_layout_matches_reference(name, k):
    generator = torch.Generator().manual_seed(k)
    scheme = parse_scheme(name)
    packed = scheme.pack(scheme.quantize(torch.randn(24, k, generator=generator)))
    lowering = lower_site("layer", scheme, packed, k, ExportOptions())
    x, bias = torch.randn(3, 5, k, generator=generator), torch.randn(24, generator=generator)
    got = lowering.op(x, *lowering.tensors.values(), bias, *lowering.attrs)
    expected = scheme.reference_linear(x, packed.list(), bias, 24)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert lowering.tensors["qweight"] is not None and lowering.tensors["qweight"].dtype == torch.uint8
    assert ("rotation" in lowering.tensors) == (scheme.rotation is not None)


@pytest.mark.parametrize("name", ["mxfp4-w4a4", "nvfp4-w4a4-had"])
def test_w4a4_is_a_clear_error(name):
    scheme = parse_scheme(name)
    packed = scheme.pack(scheme.quantize(torch.randn(8, 64)))
    with pytest.raises(OnnxExportError) as error:
        lower_site("model.layers.3.mlp.up_proj", scheme, packed, 64, ExportOptions())
    for word in ("model.layers.3.mlp.up_proj", name, name.replace("-w4a4", "")):
        assert word in str(error.value)


# (name, in, out, scheme): K ragged against the group and the rotation
LAYERS = [("l0", 70, 48, "mxfp4"), ("l1", 48, 40, "mxfp4-had64"), ("l2", 40, 56, "nvfp4"),
          ("l3", 56, 24, "nvfp4-had")]  # fmt: skip


def test_exported_model_matches_the_reference_in_onnxruntime(tmp_path):
    torch.manual_seed(0)
    recipe = {"default": None, "overrides": [{"targets": [name], "scheme": scheme} for name, _, _, scheme in LAYERS]}
    program = qcompile.compile(Stack(LAYERS).eval(), (torch.randn(2, 5, 70),), recipe, progress_bar=False)
    path = tmp_path / "fp4.onnx"
    report = qcompile.onnx.export(program, path=path)
    onnx.checker.check_model(str(path))
    assert report.max_abs_diff < 1e-3
    counts = op_counts(path)
    assert counts["Gather"] == 4 and counts["MatMul"] == 6  # 4 weight matmuls and 2 rotations
    assert_parity(path, program, (torch.randn(4, 3, 70) * 2,))
