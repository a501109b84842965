"""Import: the bundled SmolLM2 GGUF loads with its blocks kept, in under 10 s, and gives the logits of the dequantized
float model (transformers' own GGUF load, ``qcompile.models.load_smollm2``); types the family lacks load float with
one printed line, or are refused with ``keep_codes="strict"``; missing keys and wrong shapes are named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

import qcompile.gguf
from qcompile.gguf import GGUFError, llama, read, writer
from qcompile.nn import QuantizedLinear


def test_smollm2_loads_with_its_blocks(smollm2_path, smollm2_codes):
    model, tokenizer, seconds = smollm2_codes
    assert seconds < 10, f"load took {seconds:.1f} s"
    file = read(smollm2_path)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(linears) == 30 * 7 + 1
    assert {m.scheme for n, m in linears.items() if n != "lm_head"} == {"q4_1"}
    assert linears["lm_head"].scheme == "q8_0"  # tied output: the token_embd blocks
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert torch.equal(linears["lm_head"].blocks, file.raw("token_embd.weight"))
    assert torch.equal(linears["model.layers.3.self_attn.v_proj"].blocks, file.raw("blk.3.attn_v.weight"))
    q = linears["model.layers.3.self_attn.q_proj"].blocks
    assert not torch.equal(q, file.raw("blk.3.attn_q.weight"))
    assert torch.equal(llama.permute_rows(q, 9), file.raw("blk.3.attn_q.weight"))
    raw = file.raw("token_embd.weight")[:64].numpy()
    embed = quants.dequantize(raw, GGMLQuantizationType.Q8_0)
    assert np.array_equal(model.model.embed_tokens.weight[:64].numpy(), embed)  # the gather: dequantized


def test_smollm2_logits_equal_the_dequantized_float_model(smollm2_codes):
    from qcompile import models

    model, tokenizer, _ = smollm2_codes
    reference, reference_tokenizer = models.load_smollm2()
    text = "The king said to the queen"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == reference_tokenizer(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        got, expected = model(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def _tiny_file(tmp_path, replace=None, drop_key=None):
    """A tiny llama GGUF (q8_0 linears, written by ``qcompile.gguf.save``), optionally with one tensor replaced by
    ``replace = (name, ggml type, float weight)`` or one metadata key dropped."""
    import qcompile
    from qcompile.models import tiny_llama

    model = tiny_llama(seed=0, layers=1)
    qcompile.quantize(model, "q8_0", progress_bar=False)
    path = tmp_path / "tiny.gguf"
    qcompile.gguf.save(model, path)
    file = read(path)
    metadata = [(k, (writer.ARRAY, item) if t == writer.ARRAY else t, v) for k, (t, item), v in
                ((k, file.value_types[k], v) for k, v in file.metadata.items()) if k != drop_key]  # fmt: skip
    tensors = []
    for name, info in file.tensors.items():
        type_id, shape, data = info.type_id, info.shape, file.raw(name)
        if replace and name == replace[0]:
            type_id, shape = replace[1].value, tuple(reversed(replace[2].shape))
            data = torch.from_numpy(quants.quantize(replace[2].numpy(), replace[1]))
        tensors.append((name, type_id, shape, data))
    out = tmp_path / "forged.gguf"
    writer.write(out, metadata, tensors)
    return model, out


def test_type_the_family_lacks_loads_float_or_is_refused(tmp_path, capsys):
    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
    _, path = _tiny_file(tmp_path, ("blk.0.ffn_up.weight", GGMLQuantizationType.MXFP4, weight))
    model, _ = qcompile.gguf.load(path)
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["qcompile.gguf: blk.0.ffn_up.weight is MXFP4 (no gguf scheme): loaded dequantized to float32"]
    up = model.model.layers[0].mlp.up_proj
    assert type(up) is torch.nn.Linear
    mxfp4 = GGMLQuantizationType.MXFP4
    expected = quants.dequantize(quants.quantize(weight.numpy(), mxfp4), mxfp4)
    assert np.array_equal(up.weight.detach().numpy(), expected)
    with pytest.raises(GGUFError, match=r"tensor 'blk.0.ffn_up.weight' is MXFP4, a type the gguf scheme family lacks"):
        qcompile.gguf.load(path, keep_codes="strict")


def test_tiny_model_round_trips_with_the_same_logits(tmp_path):
    model, path = _tiny_file(tmp_path)
    loaded, tokenizer = qcompile.gguf.load(path)
    assert tokenizer is None  # the file says tokenizer.ggml.model = "none"
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    dequantized, _ = qcompile.gguf.load(path, keep_codes=False)
    assert not any(isinstance(m, QuantizedLinear) for m in dequantized.modules())
    with torch.no_grad():
        torch.testing.assert_close(dequantized(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_missing_key_and_wrong_shape_are_named(tmp_path):
    _, path = _tiny_file(tmp_path, drop_key="llama.embedding_length")
    with pytest.raises(GGUFError, match=r"forged.gguf: metadata key llama.embedding_length is missing"):
        qcompile.gguf.load(path)
    _, path = _tiny_file(tmp_path, ("blk.0.ffn_up.weight", GGMLQuantizationType.Q8_0, torch.zeros(64, 64)))
    with pytest.raises(GGUFError, match=r"tensor 'blk.0.ffn_up.weight' has shape \[64, 64\].*the config implies "
                                        r"\[96, 64\]"):  # fmt: skip
        qcompile.gguf.load(path)
