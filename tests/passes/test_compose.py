"""Entry points compose: a model quantized eagerly goes into ``compile``, ``export``/``load`` and ``quantize`` again
with its quantized layers taken as they are (the plan marks them pre-quantized and counts their bytes)."""

from __future__ import annotations

import warnings

import pytest
import torch

import qcompile
from qcompile.models import tiny_llama
from qcompile.nn import QuantizedLinear

RECIPE = {"default": "int4-g32", "overrides": [{"targets": ["re:.*down_proj$"], "scheme": "int8"}]}


def _ids(length=16, seed=0):
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out


@pytest.fixture(scope="module")
def quantized():
    model = qcompile.quantize(tiny_llama(), RECIPE, progress_bar=False)
    return model, _logits(model(input_ids=_ids())).detach()


def _buffers(module):
    packed = ("qweight", "scales", "zeros")
    return {name: tensor for name, tensor in module.named_buffers() if name.rsplit(".", 1)[-1] in packed}


def test_compile_takes_the_quantized_layers_as_they_are(quantized):
    model, expected = quantized
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = qcompile.compile(model, (), RECIPE, example_kwargs={"input_ids": _ids()}, progress_bar=False)
    entries = {e.site.name: e for e in program.plan}
    assert entries["model.layers.0.mlp.down_proj"].scheme == "int8"
    assert entries["model.layers.1.self_attn.q_proj"].scheme == "int4-g32"
    pre = [e for e in program.plan if e.prequantized]
    assert len(pre) == 14 and all(e.note == "pre-quantized" for e in pre)
    assert program.plan.bytes_after < program.plan.bytes_before / 3  # the packed bytes, not "1.00x smaller"
    assert "14/15 quantized" in program.plan.table()
    torch.testing.assert_close(_logits(program(input_ids=_ids())), expected, rtol=0, atol=0)


def test_export_and_load_of_an_eagerly_quantized_model(quantized, tmp_path):
    model, expected = quantized
    path = tmp_path / "eager.qpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qcompile.export(model, (), None, path, example_kwargs={"input_ids": _ids()}, progress_bar=False)
        float_path = tmp_path / "float.qpt"
        qcompile.export(tiny_llama(), (), {"default": None}, float_path, example_kwargs={"input_ids": _ids()},
                        progress_bar=False)  # fmt: skip
    loaded = qcompile.load(path)  # a causal LM: the KV-cache step program (same layers, another attention route)
    saved = loaded.plan.bytes_before - loaded.plan.bytes_after
    # a float copy of the quantized weights would make it as large as the float file (graph and alignment differ)
    assert path.stat().st_size <= float_path.stat().st_size - saved / 2
    torch.testing.assert_close(_logits(loaded(input_ids=_ids())), expected, rtol=1e-5, atol=1e-6)
    assert sum(e.prequantized for e in loaded.plan) == 14


def test_quantize_again_keeps_the_quantized_layers_and_says_so():
    model = qcompile.quantize(tiny_llama(), RECIPE, progress_bar=False)
    before = {name: tensor.clone() for name, tensor in _buffers(model).items()}
    qcompile.quantize(model, "int8", progress_bar=False)
    after = _buffers(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    entry = model.qcompile_plan.entry("model.layers.0.self_attn.q_proj")
    assert entry.prequantized and entry.scheme == "int4-g32"
    assert "int8 not applied" in entry.reason
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 14


def test_a_recipe_on_a_partly_quantized_model_applies_to_its_float_layers():
    model = qcompile.quantize(tiny_llama(), {"default": None, "overrides": [{"targets": ["*.mlp.*"],
                                                                              "scheme": "int4-g32"}]},
                              progress_bar=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = qcompile.compile(model, (), "int8", example_kwargs={"input_ids": _ids()}, progress_bar=False)
    entries = {e.site.name: e for e in program.plan}
    assert entries["model.layers.0.mlp.up_proj"].prequantized and entries["model.layers.0.mlp.up_proj"].scheme == \
        "int4-g32"  # fmt: skip
    assert entries["model.layers.0.self_attn.q_proj"].scheme == "int8"
    assert not entries["model.layers.0.self_attn.q_proj"].prequantized


def test_a_target_that_names_no_layer_is_still_an_error(quantized):
    model, _ = quantized
    with pytest.raises(qcompile.RecipeError, match="matches no matmul site"):
        qcompile.quantize(model, {"default": "int8", "overrides": [{"targets": ["*.nothing"], "scheme": "int4"}]},
                          progress_bar=False)  # fmt: skip


class _Mixed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.emb = torch.nn.Embedding(10, 16)
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, ids, image):
        return self.fc(self.emb(ids)).sum() + self.conv(image).sum()


def test_convolutions_and_embeddings_are_listed_as_kept_float():
    inputs = (torch.tensor([[1, 2]]), torch.randn(1, 3, 8, 8))
    eager = qcompile.quantize(_Mixed(), "int8", progress_bar=False).qcompile_plan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = qcompile.compile(_Mixed(), inputs, "int8", progress_bar=False).plan
    for plan in (eager, compiled):
        entries = {e.site.name: e for e in plan}
        assert entries["fc"].scheme == "int8"
        assert entries["conv"].scheme is None and "convolution" in entries["conv"].reason
        assert entries["emb"].scheme is None and "embedding" in entries["emb"].reason
        assert entries["conv"].site.weight_bytes == 8 * 3 * 3 * 3 * 4
        assert "kept float: convolution" in plan.table()


def test_a_tied_embedding_is_counted_once():
    plan = qcompile.quantize(tiny_llama(), "int8", progress_bar=False).qcompile_plan
    assert "model.embed_tokens" not in {e.site.name for e in plan}  # it is the head's weight: lm_head's site
