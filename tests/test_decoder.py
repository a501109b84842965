"""qcompile.decoder.Decoder: the lean decode step computes what transformers' model computes."""

from __future__ import annotations

import warnings

import pytest
import torch

import qcompile
from qcompile.decoder import Decoder, DecoderError, _Split
from qcompile.models import tiny_gpt2, tiny_llama


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _quantized(recipe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qcompile.quantize(tiny_llama(seed=1), recipe, progress_bar=False)


@pytest.mark.parametrize("batch", [1, 2])
def test_prompt_logits_match_the_model(batch):
    model = tiny_llama()
    ids = _ids(batch, 9)
    with torch.no_grad():
        expected = model(input_ids=ids).logits[:, -1]
    got = Decoder(model, max_length=32, max_batch=batch).step(ids, 0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_greedy_generation_equals_transformers_generate():
    model = tiny_llama(seed=3)
    model.config.use_cache = True
    ids = _ids(1, 5, seed=3)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(Decoder(model, max_length=64).generate(ids, 12), expected)


def test_a_prompt_in_two_chunks_equals_one_step():
    """A chunk after the first (start > 0, several tokens) sees the cache and a causal mask within itself."""
    model = tiny_llama(seed=4)
    ids = _ids(2, 11, seed=4)
    one = Decoder(model, max_length=32, max_batch=2).step(ids, 0)
    decoder = Decoder(model, max_length=32, max_batch=2)
    decoder.step(ids[:, :6], 0)
    torch.testing.assert_close(decoder.step(ids[:, 6:], 6), one, rtol=1e-5, atol=1e-5)



def test_decode_steps_match_the_model_on_both_sides_of_the_fused_attention_limit(monkeypatch):
    """One-token steps up to FUSED_ATTENTION_MAX positions take qcompile_cpu::decode_attention, later ones SDPA:
    every position's logits equal the model's, batch 2."""
    import qcompile.decoder as decoder_module

    monkeypatch.setattr(decoder_module, "FUSED_ATTENTION_MAX", 6)
    model = tiny_llama(seed=5)
    ids = _ids(2, 11, seed=7)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    decoder = Decoder(model, max_length=16, max_batch=2)
    decoder.step(ids[:, :1], 0)
    for t in range(1, 11):
        torch.testing.assert_close(decoder.step(ids[:, t : t + 1], t), expected[:, t], rtol=1e-5, atol=1e-5)

def test_quantized_projections_are_stacked_and_match_the_quantized_model():
    model = _quantized("int4-g32")
    decoder = Decoder(model, max_length=32)
    assert decoder.fused == len(decoder.layers)  # q/k/v stacked into one quantized linear in every layer
    ids = _ids(1, 7, seed=5)
    with torch.no_grad():
        expected = model(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(decoder.step(ids, 0), expected, rtol=1e-4, atol=1e-4)


def test_projections_of_different_schemes_run_side_by_side():
    model = _quantized({"default": "int4-g32", "overrides": [{"targets": ["*k_proj"], "scheme": "int8"}]})
    decoder = Decoder(model, max_length=32)
    assert all(isinstance(layer.qkv, _Split) for layer in decoder.layers)
    ids = _ids(1, 6, seed=6)
    with torch.no_grad():
        expected = model(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(decoder.step(ids, 0), expected, rtol=1e-4, atol=1e-4)


def test_models_it_cannot_run_are_refused_by_name():
    with pytest.raises(DecoderError, match="model_type 'gpt2'"):
        Decoder(tiny_gpt2())
    decoder = Decoder(tiny_llama(), max_length=8)
    with pytest.raises(ValueError, match="max_length 8"):
        decoder.step(_ids(1, 9), 0)
    with pytest.raises(ValueError, match=r"batch 2 \(max 1\)"):
        decoder.step(_ids(2, 3), 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_rms_norm_and_rope_ops_match_transformers(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    from qcompile.codegen.cpp import op

    assert op.load()
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, 5, 48, generator=generator).to(dtype)
    norm = LlamaRMSNorm(48, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=generator))
        expected = norm(x)
    got = torch.ops.qcompile_cpu.rms_norm(x, norm.weight.detach(), 1e-6)
    torch.testing.assert_close(got, expected, rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-6)
    heads, d = 3, 16  # two query heads and one key head rotated, the value head left alone
    qkv = torch.randn(2, 5, (heads + 1) * d, generator=generator).to(dtype)
    cos, sin = torch.randn(5, d, generator=generator).to(dtype), torch.randn(5, d, generator=generator).to(dtype)
    q = qkv[..., : 2 * d].reshape(2, 5, 2, d).transpose(1, 2)
    k = qkv[..., 2 * d : 3 * d].reshape(2, 5, 1, d).transpose(1, 2)
    q_ref, k_ref = apply_rotary_pos_emb(q.float(), k.float(), cos.float()[None], sin.float()[None])
    rotated = qkv.clone()
    torch.ops.qcompile_cpu.rope_(rotated, cos, sin, heads)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(rotated[..., : 2 * d].reshape(2, 5, 2, d).transpose(1, 2).float(), q_ref, **tol)
    torch.testing.assert_close(rotated[..., 2 * d : 3 * d].reshape(2, 5, 1, d).transpose(1, 2).float(), k_ref, **tol)
    assert torch.equal(rotated[..., 3 * d :], qkv[..., 3 * d :])
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.qcompile_cpu.rms_norm(x.double(), norm.weight.double(), 1e-6)
    with pytest.raises(RuntimeError, match="5 heads of 16 channels"):
        torch.ops.qcompile_cpu.rope_(qkv, cos, sin, 5)  # 5 heads of 16 channels do not fit in 64



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_add_rms_norm_and_silu_mul_match_torch(dtype):
    from qcompile.codegen.cpp import op

    assert op.load()
    generator = torch.Generator().manual_seed(12)
    x, delta = (torch.randn(2, 3, 40, generator=generator).to(dtype) for _ in range(2))
    weight = torch.randn(40, generator=generator).to(dtype)
    total, normed = torch.ops.qcompile_cpu.add_rms_norm(x, delta, weight, 1e-6)
    assert torch.equal(total, x + delta)  # the residual rounds as torch's add does
    torch.testing.assert_close(normed, torch.ops.qcompile_cpu.rms_norm(x + delta, weight, 1e-6), rtol=0, atol=0)
    gate_up = torch.randn(2, 3, 2 * 24, generator=generator).to(dtype)
    g, u = gate_up.chunk(2, dim=-1)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(torch.ops.qcompile_cpu.silu_mul(gate_up), torch.nn.functional.silu(g) * u, **tol)
    with pytest.raises(RuntimeError, match="expected equal shapes"):
        torch.ops.qcompile_cpu.add_rms_norm(x, delta[:, :2].contiguous(), weight, 1e-6)
    with pytest.raises(RuntimeError, match=r"expected \[\.\.\., 2F\]"):
        torch.ops.qcompile_cpu.silu_mul(gate_up[..., :47].contiguous())

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_decode_attention_matches_sdpa(dtype):
    from qcompile.codegen.cpp import op

    assert op.load()
    generator = torch.Generator().manual_seed(11)
    b, h, kv, d, length, start = 2, 6, 2, 16, 10, 6  # three query heads share each key/value head
    qkv = torch.randn(b, 1, (h + 2 * kv) * d, generator=generator).to(dtype)
    keys = torch.randn(b, kv, length, d, generator=generator).to(dtype)
    values = torch.randn(b, kv, length, d, generator=generator).to(dtype)
    keys_ref, values_ref = keys.clone(), values.clone()
    out = torch.ops.qcompile_cpu.decode_attention(qkv, keys, values, start, h, kv, d**-0.5)
    q, k, v = qkv.split((h * d, kv * d, kv * d), dim=-1)
    keys_ref[:, :, start], values_ref[:, :, start] = k.reshape(b, kv, d), v.reshape(b, kv, d)
    assert torch.equal(keys, keys_ref) and torch.equal(values, values_ref)  # the new position written, nothing else
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.double().reshape(b, 1, h, d).transpose(1, 2), keys_ref[:, :, : start + 1].double().repeat_interleave(3, 1),
        values_ref[:, :, : start + 1].double().repeat_interleave(3, 1),
    ).transpose(1, 2).reshape(b, 1, h * d)  # fmt: skip
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    with pytest.raises(RuntimeError, match="do not fit"):
        torch.ops.qcompile_cpu.decode_attention(qkv, keys, values, length, h, kv, d**-0.5)  # past the cache
    with pytest.raises(RuntimeError, match="do not fit"):
        torch.ops.qcompile_cpu.decode_attention(qkv, keys, values, 0, h, 4, d**-0.5)  # 4 key heads: wrong width

def test_the_torch_path_gives_the_same_logits_as_the_cpu_ops():
    model = _quantized("int4-g32")
    ids = _ids(1, 7, seed=8)
    fast = Decoder(model, max_length=32)
    plain = Decoder(model, max_length=32)
    plain.cpu_ops = False
    assert fast.cpu_ops
    torch.testing.assert_close(fast.step(ids, 0), plain.step(ids, 0), rtol=1e-5, atol=1e-5)
