"""``higgs`` in ONNX: the export-only op (its nodes in plain PyTorch) against the scheme's reference for every code
width, the Kronecker factors of the rotation, and an onnxruntime run of an exported model against qcompile's
reference."""

from __future__ import annotations

import onnx
import pytest
import torch

import qcompile
import qcompile.onnx
from qcompile.onnx.base import ExportOptions
from qcompile.onnx.families import higgs as higgs_onnx
from qcompile.onnx.families import lower_site
from qcompile.schemes import parse_scheme
from qcompile.schemes.fp4 import hadamard

from conftest import Stack, assert_sizes, op_counts

#: every code width (4-, 6-, 8-bit vector codes; 2-, 3-, 4-bit scalar ones) and Hadamard sizes 32 to 1024
FORMS = ["higgs-2-h64", "higgs-3-h32", "higgs-4-h64", "higgs-2-p1-h32", "higgs-3-p1", "higgs-4-p1-h1024", "higgs-4"]


@pytest.mark.parametrize("h", [32, 64, 128, 512, 1024])
def test_rotation_factors_are_the_sylvester_hadamard(h):
    """``H_h = H_a ⊗ H_b``, so a block's ``[a, b]`` reshape rotates as ``H_a @ X @ H_b``."""
    a, b = higgs_onnx.factors(h)
    assert a * b == h and a <= b <= 2 * a
    torch.testing.assert_close(torch.kron(hadamard(a), hadamard(b)), hadamard(h), rtol=0, atol=1e-15)
    x = torch.randn(3, h, dtype=torch.float64)
    rotated = (hadamard(a) @ x.reshape(3, a, b) @ hadamard(b)).reshape(3, h)
    torch.testing.assert_close(rotated, x @ hadamard(h), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", FORMS)
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
    assert lowering.tensors["qweight"] is packed.qweight or torch.equal(lowering.tensors["qweight"], packed.qweight)
    assert lowering.tensors["scales"].dtype == torch.float16  # the file keeps the packed bytes
    a, b = higgs_onnx.factors(scheme.hadamard)
    assert lowering.tensors["hadamard_a"].shape == (a, a) and lowering.tensors["hadamard_b"].shape == (b, b)


# (name, in, out, scheme): K ragged against the Hadamard block
LAYERS = [("l0", 70, 48, "higgs-4-h64"), ("l1", 48, 40, "higgs-3-h32"), ("l2", 40, 56, "higgs-2-p1-h32"),
          ("l3", 56, 24, "higgs-4-p1-h64")]  # fmt: skip


def test_exported_model_matches_the_reference_in_onnxruntime(tmp_path):
    torch.manual_seed(0)
    recipe = {"default": None, "overrides": [{"targets": [name], "scheme": scheme} for name, _, _, scheme in LAYERS]}
    program = qcompile.compile(Stack(LAYERS).eval(), (torch.randn(2, 5, 70),), recipe, progress_bar=False)
    path = tmp_path / "higgs.onnx"
    report = qcompile.onnx.export(program, path=path)
    onnx.checker.check_model(str(path))
    assert report.max_abs_diff < 1e-3
    counts = op_counts(path)
    assert counts["Gather"] == 4 and counts["MatMul"] == 12  # per layer: two rotation factors and the weight matmul
    # the file holds each site's packed bytes as they are, plus its grid and rotation factors (and nothing as float)
    sizes = {t.name: len(t.raw_data) for t in onnx.load(str(path), load_external_data=False).graph.initializer}
    for site, (_, k, n, name) in zip(report.sites, LAYERS):
        scheme = parse_scheme(name)
        a, b = higgs_onnx.factors(scheme.hadamard)
        assert sizes[site.paths["qweight"]] + sizes[site.paths["scales"]] == scheme.packed_nbytes(n, k)
        assert sizes[site.paths["grid"]] == 4 * 2**scheme.code_bits * scheme.dim
        assert sizes.get(site.paths["hadamard_a"], 4 * a * a) == 4 * a * a  # identical factors are stored once
    assert_sizes(report, program, slack=0.5)  # tiny layers: the grids and factors are a third of the bytes
