"""bitsandbytes 4-bit import: weights quantized by bitsandbytes' own ``quantize_4bit`` (CPU), serialized as
``Linear4bit`` saves them; the imported layer's dequantized weight equals ``dequantize_4bit`` bit for bit (NF4 and
FP4, with and without double quantization, float32 / bfloat16 / float16 weights); a tiny Llama checkpoint loads to
the dequantized float model's logits; K not a multiple of the blocksize and a foreign table are refused by name."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

from import_writers import bnb_layer, logits, tiny_llama, write_checkpoint  # noqa: E402
from qcompile.hf.checkpoints import CheckpointError, bitsandbytes, load  # noqa: E402

CONFIG = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
          "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "float32"}  # fmt: skip


def _weight(n=48, k=192, seed=0, dtype=torch.float32):
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


@pytest.mark.parametrize("quant_type, scheme", [("nf4", "nf4-g64"), ("fp4", "bnb-fp4-g64")])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantized_weight_equals_bitsandbytes(quant_type, scheme, double_quant, dtype):
    tensors, theirs = bnb_layer(_weight(dtype=dtype, seed=3), quant_type, double_quant)
    assert theirs.dtype == dtype
    layer = bitsandbytes.convert(tensors, CONFIG, in_features=192, out_features=48, where="l")
    assert layer.scheme == scheme
    ours = layer.dequantized_weight()
    assert ours.dtype == torch.float32 and torch.equal(ours.to(dtype), theirs)
    x = torch.randn(2, 192, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer.module()(x), x @ ours.t(), rtol=1e-5, atol=1e-5)


def test_tables_are_bitsandbytes_own():
    import bitsandbytes.functional as F

    from qcompile.schemes.bnb_fp4 import BNB_FP4_LEVELS
    from qcompile.schemes.nf4 import NF4_LEVELS

    assert F.get_4bit_type("fp4", device="cpu").tolist() == list(BNB_FP4_LEVELS)
    assert F.get_4bit_type("nf4", device="cpu").tolist() == list(NF4_LEVELS)


def test_blocksize_128_maps_to_group_128():
    tensors, theirs = bnb_layer(_weight(k=256), "nf4", True, blocksize=128)
    layer = bitsandbytes.convert(tensors, CONFIG, where="l")
    assert layer.scheme == "nf4-g128" and torch.equal(layer.dequantized_weight(), theirs)


def test_unsupported_layouts_are_refused_by_name():
    tensors, _ = bnb_layer(_weight(k=96), "nf4", False)  # blocks of 64 straddle rows of 96
    with pytest.raises(CheckpointError, match=r"mlp: K=96 is not a multiple of the blocksize 64.*straddle rows"):
        bitsandbytes.convert(tensors, CONFIG, where="mlp")
    tensors, _ = bnb_layer(_weight(), "nf4", False)
    foreign = dict(tensors, **{"weight.quant_map": tensors["weight.quant_map"].flip(0)})
    with pytest.raises(CheckpointError, match=r"mlp\.weight\.quant_map: differs from the nf4 table"):
        bitsandbytes.convert(foreign, CONFIG, where="mlp")
    with pytest.raises(CheckpointError, match=r"mlp\.weight\.quant_state: shape \[48, 192\], the model's layer is "
                                              r"\[48, 128\]"):  # fmt: skip
        bitsandbytes.convert(tensors, CONFIG, in_features=128, out_features=48, where="mlp")
    short = dict(tensors, **{"weight.absmax": tensors["weight.absmax"][:-1]})
    with pytest.raises(CheckpointError, match=r"mlp\.weight\.absmax: is float32\[143\], expected float32\[144\]"):
        bitsandbytes.convert(short, CONFIG, where="mlp")
    with pytest.raises(CheckpointError, match=r"8-bit \(load_in_8bit\)"):
        bitsandbytes.layers([], {"quant_method": "bitsandbytes", "load_in_8bit": True})


def test_tiny_llama_checkpoint_gives_the_dequantized_float_models_logits(tmp_path):
    model = tiny_llama(seed=2)
    reference = write_checkpoint(model, tmp_path, CONFIG, lambda name, w: bnb_layer(w, "nf4", True))
    loaded = load(tmp_path, dtype=torch.float32)
    assert [scheme for _, scheme, _ in loaded.qcompile_import] == ["nf4-g64"] * 14
    torch.testing.assert_close(logits(loaded), logits(reference), rtol=1e-4, atol=1e-4)
