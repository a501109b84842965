"""AWQ GEMM import: layers packed as AutoAWQ packs them (the [0, 2, 4, 6, 1, 3, 5, 7] nibble interleave), checked
against ``(q - z) * s`` in float64 bit for bit; a tiny Llama checkpoint loads to the dequantized float model's
logits; other versions and mismatched tensors are refused by name."""

from __future__ import annotations

import pytest
import torch

from import_writers import awq_layer, logits, tiny_llama, write_checkpoint
from qcompile.hf.checkpoints import CheckpointError, awq, load

N, K = 64, 192
CONFIG = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"}


def _weight(seed=0):
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("group, scheme", [(64, "int4-g64"), (128, "int4-g128")])  # 128: a ragged last group
def test_layer_equals_published_dequantization(group, scheme):
    tensors, w64 = awq_layer(_weight(group), group, bias=True)
    layer = awq.convert(tensors, {**CONFIG, "group_size": group}, in_features=K, out_features=N, where="l")
    assert layer.scheme == scheme and layer.permutation is None
    assert torch.equal(layer.dequantized_weight().double(), w64)
    x = torch.randn(4, K, generator=torch.Generator().manual_seed(1))
    expected = x.double() @ w64.t() + tensors["bias"].double()
    torch.testing.assert_close(layer.module()(x).double(), expected, rtol=1e-5, atol=1e-4)


def test_interleave_is_read_not_assumed():
    """One code per column set by hand: column j of word 0 holds j, so nibble i of the word holds ORDER[i]."""
    tensors, _ = awq_layer(_weight(), 64)
    word = sum(awq.ORDER[i] << (4 * i) for i in range(8))
    qweight = torch.zeros_like(tensors["qweight"])
    qweight[0, 0] = word
    codes = awq.unpack_interleaved(qweight, N)
    assert codes[0, :8].tolist() == list(range(8)) and not codes[1:].any()


def test_other_versions_and_mismatches_are_refused_by_name():
    tensors, _ = awq_layer(_weight(), 64)
    with pytest.raises(CheckpointError, match=r"AWQ version 'gemv' is not supported"):
        awq.convert(tensors, {**CONFIG, "version": "gemv"})
    with pytest.raises(CheckpointError, match=r"zero_point=false"):
        awq.convert(tensors, {**CONFIG, "zero_point": False})
    with pytest.raises(CheckpointError, match=r"o_proj\.scales: is float16\[3, 64\], expected .*\[6, 64\].*size=32"):
        awq.convert(tensors, {**CONFIG, "group_size": 32}, in_features=K, out_features=N, where="o_proj")
    with pytest.raises(CheckpointError, match=r"o_proj\.qzeros: missing"):
        awq.convert({k: v for k, v in tensors.items() if k != "qzeros"}, CONFIG, where="o_proj")
    with pytest.raises(CheckpointError, match=r"o_proj: bits=8 is not supported"):
        awq.convert(tensors, {**CONFIG, "bits": 8}, where="o_proj")


def test_tiny_llama_checkpoint_gives_the_dequantized_float_models_logits(tmp_path):
    model = tiny_llama(seed=1, tie=False)
    reference = write_checkpoint(model, tmp_path, CONFIG, lambda name, w: awq_layer(w, 64))
    loaded = load(tmp_path, dtype=torch.float32)
    assert [scheme for _, scheme, _ in loaded.qcompile_import] == ["int4-g64"] * 14
    assert type(loaded.lm_head) is torch.nn.Linear and loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    torch.testing.assert_close(logits(loaded), logits(reference), rtol=1e-4, atol=1e-4)
