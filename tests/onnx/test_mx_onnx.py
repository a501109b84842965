"""``mxfp6`` and ``mxfp8`` in ONNX: the export-only op against the schemes' reference, the activation forms' clear
error, and an onnxruntime run of an exported model against qcompile's reference."""

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

WEIGHT_ONLY = ["mxfp6-e3m2", "mxfp6-e2m3", "mxfp8-e4m3", "mxfp8-e5m2"]


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
    assert lowering.tensors["qweight"].dtype == torch.uint8
    assert lowering.tensors["qweight"].shape == (24, scheme.padded_in_features(k) * scheme.bits // 8)
    assert lowering.tensors["levels"].numel() == 1 << scheme.bits


@pytest.mark.parametrize("name", ["mxfp6-e3m2-w6a6", "mxfp8-e5m2-w8a8"])
def test_activation_forms_are_a_clear_error(name):
    scheme = parse_scheme(name)
    packed = scheme.pack(scheme.quantize(torch.randn(8, 64)))
    with pytest.raises(OnnxExportError) as error:
        lower_site("model.layers.3.mlp.up_proj", scheme, packed, 64, ExportOptions())
    for word in ("model.layers.3.mlp.up_proj", name, name.rsplit("-", 1)[0], "weight-only"):
        assert word in str(error.value)


# (name, in, out, scheme): K ragged against the group of 32
LAYERS = [("l0", 70, 48, "mxfp6-e3m2"), ("l1", 48, 40, "mxfp6-e2m3"), ("l2", 40, 56, "mxfp8-e4m3"),
          ("l3", 56, 24, "mxfp8-e5m2")]  # fmt: skip


def test_exported_model_matches_the_reference_in_onnxruntime(tmp_path):
    torch.manual_seed(0)
    recipe = {"default": None, "overrides": [{"targets": [name], "scheme": scheme} for name, _, _, scheme in LAYERS]}
    program = qcompile.compile(Stack(LAYERS).eval(), (torch.randn(2, 5, 70),), recipe, progress_bar=False)
    path = tmp_path / "mx.onnx"
    report = qcompile.onnx.export(program, path=path)
    onnx.checker.check_model(str(path))
    assert report.max_abs_diff < 1e-3
    counts = op_counts(path)
    assert counts["Gather"] == 4 and counts["MatMul"] == 4 and counts["BitShift"] == 2 * 6  # two fp6 sites
    assert_parity(path, program, (torch.randn(4, 3, 70) * 2,))
