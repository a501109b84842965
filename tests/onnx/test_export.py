"""End to end: quantized programs exported, checked by onnx, run in onnxruntime at shapes other than the
examples, and compared with qcompile's reference op (relative 1e-3)."""

from __future__ import annotations

import onnx
import pytest
import torch

import qcompile
import qcompile.onnx
from qcompile.models import load_minilm, tiny_llama

from conftest import Stack, assert_parity, assert_sizes, op_counts

# (name, in, out, scheme): K not a multiple of the group in several layers, so the padding is exercised
LAYERS = [
    ("l0", 64, 160, "int8"), ("l1", 160, 80, "int4-g128"), ("l2", 80, 72, "int4-g32"), ("l3", 72, 64, "int4-g32-sym"),
    ("l4", 64, 64, "int2-g32"), ("l5", 64, 48, "w8a8"), ("l6", 48, 56, "fp8"), ("l7", 56, 40, "nf4-g32"),
    ("l8", 40, 24, "int8-g16"), ("l9", 24, 16, "nf4-g16"),
]  # fmt: skip


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits


@pytest.fixture(scope="module")
def stack_program():
    torch.manual_seed(0)
    recipe = {"default": None, "overrides": [{"targets": [name], "scheme": scheme} for name, _, _, scheme in LAYERS]}
    return qcompile.compile(Stack(LAYERS).eval(), (torch.randn(2, 5, 64),), recipe, progress_bar=False)


@pytest.mark.parametrize("int4_format", ["matmulnbits", "qdq"])
def test_every_scheme(stack_program, int4_format, tmp_path):
    path = tmp_path / "stack.onnx"
    report = qcompile.onnx.export(stack_program, path=path, int4_format=int4_format)
    onnx.checker.check_model(str(path))
    assert len(report.comparisons) == 2 and report.max_abs_diff < 1e-4
    counts = op_counts(path)
    nbits = 4 if int4_format == "matmulnbits" else 1  # int2 has no ONNX type: MatMulNBits either way
    assert counts.get("MatMulNBits", 0) == nbits
    assert counts["DequantizeLinear"] == (3 if int4_format == "matmulnbits" else 6)  # int8 x2, fp8 (+ int4 x3)
    assert counts["MatMulInteger"] == 1 and counts["Gather"] == 2
    assert_sizes(report, stack_program)
    assert_parity(path, stack_program, (torch.randn(4, 3, 64) * 2,))


def test_validation_error_names_the_output(stack_program, tmp_path):
    with pytest.raises(qcompile.onnx.OnnxValidationError, match="does not match qcompile"):
        qcompile.onnx.export(stack_program, path=tmp_path / "strict.onnx", atol=0.0, int4_format="qdq")


def test_tiny_llama(tmp_path):
    model = Logits(tiny_llama())
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    recipe = {"default": "int4-g32", "overrides": [{"targets": ["*.q_proj"], "scheme": "int8"},
                                                   {"targets": ["*.down_proj"], "scheme": "w8a8"}]}  # fmt: skip
    program = qcompile.compile(model, (ids,), recipe, progress_bar=False)
    path = tmp_path / "llama.onnx"
    report = qcompile.onnx.export(program, path=path)
    counts = op_counts(path)
    assert counts["MatMulNBits"] == 2 * 5 and counts["DequantizeLinear"] == 2 and counts["MatMulInteger"] == 2
    assert_sizes(report, program)
    for shape in [(1, 13), (3, 4)]:
        ids = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(1))
        assert_parity(path, program, (ids,))


@pytest.mark.slow
def test_minilm_real_weights(tmp_path):
    model, tokenizer = load_minilm()
    examples = dict(tokenizer(["quantized sentence embeddings", "run in onnxruntime"], padding=True,
                              return_tensors="pt"))  # fmt: skip
    recipe = {"default": "int8", "overrides": [{"targets": [f"encoder.layer.{i}" for i in (3, 4, 5)],
                                                "scheme": "int4-g32"}]}  # fmt: skip
    program = qcompile.compile(model, (), recipe, example_kwargs=examples, progress_bar=False)
    path = tmp_path / "minilm.onnx"
    report = qcompile.onnx.export(program, path=path)
    counts = op_counts(path)
    assert counts["MatMulNBits"] == 18 and counts["DequantizeLinear"] == 19
    packed, float_remainder = assert_sizes(report, program)
    assert report.file_bytes <= 1.10 * (packed + float_remainder)
    other = dict(tokenizer(["a different batch of sentences, longer than before", "with three", "rows"],
                           padding=True, return_tensors="pt"))  # fmt: skip
    assert_parity(path, program, (), other)


def test_float_model_and_recipe(tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(32, 16)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    report = qcompile.onnx.export(Tiny().eval(), (torch.randn(2, 3, 32),), tmp_path / "tiny.onnx", "int4-g16")
    assert [s.lowering.onnx_op for s in report.sites] == ["MatMulNBits"]
    assert "qcompile.plan" in {p.key for p in onnx.load(report.path).metadata_props}
    with pytest.raises(qcompile.onnx.OnnxExportError, match="needs a recipe"):
        qcompile.onnx.export(Tiny(), (torch.randn(2, 32),), tmp_path / "x.onnx")


def test_eagerly_quantized_model(tmp_path):
    """A model qcompile.quantize quantized exports with its layers as they are (no recipe needed); a recipe then
    applies to the float layers only."""
    model = Stack(LAYERS).eval()
    qcompile.quantize(model, {"default": None, "overrides": [{"targets": ["l1", "l2"], "scheme": "int4-g32"}]},
                      progress_bar=False)  # fmt: skip
    x = torch.randn(2, 64)
    report = qcompile.onnx.export(model, (x,), tmp_path / "eager.onnx")
    ops = {s.site: s.lowering.onnx_op for s in report.sites}
    assert set(ops) == {"l1", "l2"} and set(ops.values()) == {"MatMulNBits"}
    report = qcompile.onnx.export(model, (x,), tmp_path / "eager_int8.onnx", recipe="int8")
    assert len(report.sites) == len(LAYERS)


@pytest.mark.slow
def test_w8a8_layer_is_exact_on_real_activations(tmp_path):
    """One w8a8 matmul of MiniLM, fed real hidden states: onnxruntime equals the reference (integer sums)."""
    model, tokenizer = load_minilm()
    examples = dict(tokenizer(["per-token int8 activations", "exact integer sums"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        hidden = model(**examples, output_hidden_states=True).hidden_states[3]

    class Layer(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def forward(self, x):
            return self.linear(x)

    program = qcompile.compile(Layer(model.encoder.layer[3].intermediate.dense), (hidden,), "w8a8", progress_bar=False)
    report = qcompile.onnx.export(program, path=tmp_path / "layer.onnx")
    assert report.max_abs_diff <= 1e-6 * max(c.reference_max for c in report.comparisons)
    assert assert_parity(report.path, program, (hidden,), rtol=1e-6) <= 1e-6
