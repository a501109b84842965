"""``fp8-block`` in ONNX: the export-only op against the scheme's reference, and an exported model run in onnxruntime
against qcompile's reference op (e4m3 weights kept as e4m3 initializers, activations quantized in the graph)."""

from __future__ import annotations

import onnx
import pytest
import torch

import qcompile
import qcompile.onnx
from qcompile.onnx.base import ExportOptions
from qcompile.onnx.families import lower_site
from qcompile.schemes import parse_scheme

from conftest import Stack, assert_parity, assert_sizes, onnxruntime_outputs, op_counts


@pytest.mark.parametrize("name", ["fp8-block", "fp8-block-ue8m0"])
@pytest.mark.parametrize("n, k", [(24, 80), (130, 200), (40, 256)])
def test_onnx_layout_matches_reference(name, n, k):
    torch.manual_seed(0)
    scheme = parse_scheme(name)
    packed = scheme.pack(scheme.quantize(torch.randn(n, k)))
    lowering = lower_site("layer", scheme, packed, k, ExportOptions())
    qweight, scales = lowering.tensors["qweight"], lowering.tensors["scales"]
    assert qweight.dtype == torch.float8_e4m3fn and tuple(qweight.shape) == (k, n)
    assert torch.equal(qweight.view(torch.uint8), packed.qweight.t().view(torch.uint8))
    groups = -(-k // 128)
    assert tuple(scales.shape) == (groups, n)
    for g in range(groups):
        assert torch.equal(scales[g], packed.scales[torch.arange(n) // 128, g])
    x, bias = torch.randn(3, 5, k) * 3, torch.randn(n)
    for b in (bias, None):
        got = lowering.op(x, qweight, scales, b, *lowering.attrs)
        expected = scheme.reference_linear(x, packed.list(), b, n)
        # same e4m3 codes; the scales are applied before the float32 sums instead of after exact ones
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-6 * expected.abs().max().item())


LAYERS = [("a", 200, 130, "fp8-block"), ("b", 130, 256, "fp8-block-ue8m0"), ("c", 256, 70, "fp8-block")]


def test_onnxruntime_runs_the_export_like_qcompile(tmp_path):
    torch.manual_seed(0)
    model = Stack(LAYERS).eval()
    recipe = {"default": None, "overrides": [{"targets": [name], "scheme": scheme} for name, _, _, scheme in LAYERS]}
    program = qcompile.compile(model, (torch.randn(2, 5, 200),), recipe, progress_bar=False)
    path = tmp_path / "fp8_block.onnx"
    report = qcompile.onnx.export(program, path=path)
    onnx.checker.check_model(str(path))
    counts = op_counts(path)
    assert counts["DequantizeLinear"] == 3 and counts["MatMul"] == 3 and counts["Cast"] == 6
    weights = [t for t in onnx.load(str(path)).graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    assert sorted(tuple(t.dims) for t in weights) == sorted((k, n) for _, k, n, _ in LAYERS)
    assert_sizes(report, program)
    x = torch.randn(4, 3, 200) * 2
    worst = assert_parity(path, program, (x,), rtol=1e-4)
    # not vacuous: the same model without activation quantization is much further from onnxruntime
    with torch.no_grad():
        h = x
        for name, k, n, scheme_name in LAYERS:
            scheme = parse_scheme(scheme_name)
            layer = getattr(model, name)
            w = scheme.dequantize(scheme.quantize(layer.weight))
            h = torch.tanh(torch.nn.functional.linear(h, w, layer.bias)) * 2
    got = onnxruntime_outputs(path, (x,))[0]
    assert (got - h).abs().max().item() > 20 * max(worst, 1e-6) * h.abs().max().item()
