"""GPTQ import: layers written as AutoGPTQ / GPTQModel pack them, checked against the published dequantization in
float64 (bit for bit), with desc_act permutations, 2/3/4/8 bits, v1 and v2 zeros; a tiny Llama checkpoint loads to
the logits of the float model with the dequantized weights; tensors that disagree with the config are refused by
name."""

from __future__ import annotations

import pytest
import torch

from import_writers import gptq_layer, logits, tiny_llama, write_checkpoint
from qcompile.hf.checkpoints import CheckpointError, PermutedQuantizedLinear, gptq, load

N, K = 64, 192


def _weight(seed=0, n=N, k=K):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def _config(bits=4, group=128, sym=False, v2=False, desc_act=False):
    return {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym, "desc_act": desc_act,
            "checkpoint_format": "gptq_v2" if v2 else "gptq"}  # fmt: skip


@pytest.mark.parametrize("bits, group, sym, v2, desc_act, scheme", [
    (4, 128, False, False, False, "int4-g128"),      # ragged: K = 192 is one and a half groups
    (4, 32, True, False, False, "int4-g32-sym"),
    (4, 64, False, True, True, "int4-g64"),
    (3, 32, False, False, True, "int3-g32"),         # 3-bit words straddle
    (2, -1, False, False, False, "int2"),            # one group per row
    (8, 64, True, False, False, "int8-g64"),
    (8, 32, False, True, True, "int8-g32-asym"),
])  # fmt: skip
def test_layer_equals_published_dequantization(bits, group, sym, v2, desc_act, scheme):
    tensors, w64 = gptq_layer(_weight(bits), bits, group, sym, v2, desc_act, seed=bits, bias=True)
    layer = gptq.convert(tensors, _config(bits, group, sym, v2, desc_act), in_features=K, out_features=N,
                         where="layers.0.q")  # fmt: skip
    assert layer.scheme == scheme
    assert (layer.permutation is not None) == desc_act
    assert torch.equal(layer.dequantized_weight().double(), w64)
    module = layer.module()
    assert isinstance(module, PermutedQuantizedLinear) == desc_act
    assert torch.equal(module.dequantized_weight().double(), w64)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(7))
    expected = x.double() @ w64.t() + tensors["bias"].double()
    torch.testing.assert_close(module(x).double(), expected, rtol=1e-5, atol=1e-4)


def test_v1_zero_of_zero_reads_back_as_sixteen():
    """AutoGPTQ v1 stores zero - 1 in 4 bits, so a zero of 0 is stored as 15 and every GPTQ kernel reads 16; the
    import keeps that (a float zero of 16), matching the published formula."""
    w = _weight(3).abs() + 0.1  # all positive: min clamps to 0, zero point 0
    tensors, w64 = gptq_layer(w, 4, 64)
    layer = gptq.convert(tensors, _config(4, 64), where="l")
    assert float(layer.packed.zeros.max()) == 16.0
    assert torch.equal(layer.dequantized_weight().double(), w64)


def test_tensors_that_disagree_with_the_config_are_refused_by_name():
    tensors, _ = gptq_layer(_weight(), 4, 64)
    with pytest.raises(CheckpointError, match=r"mlp\.qweight: is int32\[24, 64\], expected int32\[48, 64\].*bits=8"):
        gptq.convert(tensors, _config(8, 64), in_features=K, out_features=N, where="mlp")
    with pytest.raises(CheckpointError, match=r"mlp\.scales: is float16\[3, 64\], expected .*\[2, 64\].*size=128"):
        gptq.convert(tensors, _config(4, 128), in_features=K, out_features=N, where="mlp")
    with pytest.raises(CheckpointError, match=r"mlp\.qzeros: sym=true but zero points .* are not 2\*\*\(bits-1\)=8"):
        gptq.convert(tensors, _config(4, 64, sym=True), where="mlp")
    with pytest.raises(CheckpointError, match=r"mlp\.qweight: is int32\[24, 64\], expected int32\[24, 32\]"):
        gptq.convert(tensors, _config(4, 64), in_features=K, out_features=32, where="mlp")
    bad = dict(tensors, g_idx=torch.zeros(K, dtype=torch.int32))
    bad["g_idx"][-1] = 1
    with pytest.raises(CheckpointError, match=r"mlp\.g_idx: its groups are not 64 columns each"):
        gptq.convert(bad, _config(4, 64), where="mlp")
    with pytest.raises(CheckpointError, match=r"checkpoint_format 'marlin' is not supported"):
        gptq.convert(tensors, {**_config(4, 64), "checkpoint_format": "marlin"}, where="mlp")
    with pytest.raises(CheckpointError, match=r"mlp: bits=5 is not supported"):
        gptq.convert(tensors, _config(5, 64), where="mlp")


def test_tiny_llama_checkpoint_gives_the_dequantized_float_models_logits(tmp_path):
    model = tiny_llama(seed=0)
    config = {**_config(4, 64, desc_act=True), "checkpoint_format": "gptq"}

    def layer(name, weight):
        tensors, w64 = gptq_layer(weight, 4, 64, desc_act=True, seed=len(name))
        return tensors, w64

    reference = write_checkpoint(model, tmp_path, config, layer)
    loaded = load(tmp_path, dtype=torch.float32)
    assert {scheme for _, scheme, _ in loaded.qcompile_import} == {"int4-g64"}
    assert len(loaded.qcompile_import) == 14
    assert isinstance(loaded.model.layers[1].mlp.down_proj, PermutedQuantizedLinear)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(logits(loaded), logits(reference), rtol=1e-4, atol=1e-4)
