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
