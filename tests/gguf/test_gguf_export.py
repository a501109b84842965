"""Export: ``qcompile.gguf.save`` read back by the peer (gguf-py ``GGUFReader``).

* SmolLM2 round trip (load with codes → save): every tensor byte-identical to the original file's, same types, the
  metadata equal; saved without the file's metadata, the keys llama.cpp needs are recomputed from the config and the
  tokenizer and equal the original's;
* a tiny Llama with a mixed recipe (k-quants, IQ4, legacy, a float layer, an untied quantized head): each tensor's
  bytes and type are what the model holds (Q/K rows permuted to llama.cpp's order), and loading it back gives the same
  logits bit for bit;
* layers that cannot be written are refused by name; ``qcompile quantize --format gguf`` writes a file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader

import qcompile
import qcompile.gguf
from qcompile.gguf import llama
from qcompile.models import tiny_llama

#: keys llama.cpp reads as required or needs in practice for a gpt2-tokenized llama (llama-model.cpp, llama-vocab.cpp)
REQUIRED = ["general.architecture", "llama.context_length", "llama.embedding_length", "llama.block_count",
            "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.layer_norm_rms_epsilon",
            "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre",
            "general.file_type", "general.quantization_version"]  # fmt: skip


def _fields(reader):
    return {k: (f.types, f.contents()) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _tensor_bytes(tensor) -> np.ndarray:
    return np.asarray(tensor.data).view(np.uint8).reshape(-1)


def test_smollm2_round_trip_is_byte_identical(smollm2_path, smollm2_codes, tmp_path):
    model, tokenizer, _ = smollm2_codes
    qcompile.gguf.save(model, tmp_path / "again.gguf", tokenizer)
    original, again = GGUFReader(smollm2_path), GGUFReader(tmp_path / "again.gguf")
    before, after = {t.name: t for t in original.tensors}, {t.name: t for t in again.tensors}
    assert set(before) == set(after)
    for name, tensor in before.items():
        assert after[name].tensor_type == tensor.tensor_type, name
        assert after[name].shape.tolist() == tensor.shape.tolist(), name
        assert np.array_equal(_tensor_bytes(after[name]), _tensor_bytes(tensor)), name
    assert _fields(again) == _fields(original)
    assert all(key in again.fields for key in REQUIRED)


def test_smollm2_metadata_recomputed_without_the_files(smollm2_path, smollm2_codes, tmp_path):
    model, tokenizer, _ = smollm2_codes
    stored = model.gguf_metadata
    try:
        del model.gguf_metadata
        qcompile.gguf.save(model, tmp_path / "fresh.gguf", tokenizer, pre="smollm")
    finally:
        model.gguf_metadata = stored
    original, fresh = _fields(GGUFReader(smollm2_path)), _fields(GGUFReader(tmp_path / "fresh.gguf"))
    assert all(key in fresh for key in REQUIRED)
    computed = [k for k in fresh if k.startswith(("llama.", "tokenizer.")) or k in REQUIRED]
    different = [k for k in computed if fresh[k] != original[k]]
    assert not different, different
    assert fresh["general.quantization_version"][1] == 2 and fresh["general.file_type"][1] == 3  # mostly Q4_1


MIXED = {"default": None, "overrides": [
    {"targets": ["re:.*q_proj$"], "scheme": "q4_k"}, {"targets": ["re:.*k_proj$"], "scheme": "q6_k"},
    {"targets": ["re:.*v_proj$"], "scheme": "q8_0"}, {"targets": ["re:.*o_proj$"], "scheme": "iq4_xs"},
    {"targets": ["re:.*gate_proj$"], "scheme": "q2_k"}, {"targets": ["re:.*down_proj$"], "scheme": "iq4_nl"},
    {"targets": ["lm_head"], "scheme": "q5_1"},
]}  # fmt: skip


def test_mixed_recipe_writes_what_the_model_holds_and_loads_back(tmp_path):
    model = tiny_llama(seed=0, tie=False, layers=2, hidden=256, intermediate=512)
    qcompile.quantize(model, MIXED, progress_bar=False)
    path = tmp_path / "mixed.gguf"
    qcompile.gguf.save(model, path, float_type="f16")
    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    modules = dict(model.named_modules())
    for name, tensor in tensors.items():
        path_kind = llama.module_path(name)
        module = modules[path_kind[0]]
        if isinstance(module, qcompile.nn.QuantizedLinear):
            blocks = module.blocks
            heads = llama.heads_for(name.rsplit(".", 1)[0], model.config)
            expected = llama.permute_rows(blocks, heads) if heads else blocks
            assert tensor.tensor_type.name.lower() == module.scheme, name
            assert np.array_equal(_tensor_bytes(tensor), expected.numpy().reshape(-1)), name
        elif name.endswith("norm.weight"):
            assert tensor.tensor_type.name == "F32"
            assert np.array_equal(np.asarray(tensor.data), module.weight.detach().numpy())
        else:  # the float layers: token_embd and up_proj, F16 here
            assert tensor.tensor_type.name == "F16", name
            assert np.array_equal(np.asarray(tensor.data), module.weight.detach().half().numpy()), name
    assert "output.weight" in tensors
    assert reader.fields["general.file_type"].contents() == 10  # Q2_K: most elements (tied with IQ4_NL, first seen)
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    assert reader.fields["tokenizer.ggml.model"].contents() == "none"
    loaded, _ = qcompile.gguf.load(path)
    loaded.model.embed_tokens.weight.data = model.model.embed_tokens.weight.data.clone()  # F16 in the file
    up = [f"model.layers.{i}.mlp.up_proj" for i in range(2)]
    for name in up:
        loaded.get_submodule(name).weight.data = model.get_submodule(name).weight.data.clone()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_layers_that_cannot_be_written_are_named(tmp_path):
    model = tiny_llama(seed=0, layers=1)
    qcompile.quantize(model, {"default": "q8_0", "overrides": [{"targets": ["re:.*v_proj$"], "scheme": "int4-g32"}]},
                      progress_bar=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"layer blk.0.attn_v.weight is int4-g32 \(family int-weight-only\)"):
        qcompile.gguf.save(model, tmp_path / "x.gguf")
    model = tiny_llama(seed=0, layers=1)  # hidden 64: not whole 256-element blocks
    qcompile.quantize(model, "q4_k", progress_bar=False)
    with pytest.raises(ValueError, match=r"layer blk.0.attn_q.weight \(q4_k\) has in_features 64, not a multiple of "
                                         r"its block size 256"):  # fmt: skip
        qcompile.gguf.save(model, tmp_path / "x.gguf")


def test_cli_quantize_format_gguf(tmp_path):
    from qcompile.cli import main

    out = tmp_path / "tiny.gguf"
    assert main(["--json", "quantize", "tiny-llama", "--recipe", "q8_0", "--format", "gguf", "-o", str(out)]) == 0
    types = [t.tensor_type.name for t in GGUFReader(out).tensors]
    assert types.count("Q8_0") == 2 * 7 and "output.weight" not in [t.name for t in GGUFReader(out).tensors]
