"""bitsandbytes import, bytes kept. 4-bit: weights quantized by bitsandbytes' own ``quantize_4bit`` (CPU), serialized
as ``Linear4bit`` saves them, become ``bnb4`` layers holding the same bytes whose dequantized weight equals bitsandbytes'
dequantization bit for bit (NF4 and FP4, with and without double quantization, float32 / bfloat16 / float16 weights,
K not a multiple of the blocksize, a non-uint8 storage dtype). 8-bit: ``Linear8bitLt`` state dicts become
``llm-int8`` layers with bitsandbytes' CB and SCB whose outputs match ``Linear8bitLt`` on inputs with outlier
columns. Tiny Llama checkpoints of both load to their float or bitsandbytes references' logits; foreign tables,
layouts and thresholds are refused by name."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("bitsandbytes")

from import_writers import (  # noqa: E402
    LLAMA_LINEARS, bnb_int8_layer, bnb_int8_module, bnb_layer, logits, tiny_llama, write_checkpoint,
)  # fmt: skip
from qcompile.hf.checkpoints import CheckpointError, bitsandbytes, load  # noqa: E402

CONFIG = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
          "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "float32"}  # fmt: skip
CONFIG_8BIT = {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False, "llm_int8_threshold": 6.0,
               "llm_int8_has_fp16_weight": False}  # fmt: skip


def _weight(n=48, k=192, seed=0, dtype=torch.float32):
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [192, 70])
def test_dequantized_weight_equals_bitsandbytes(quant_type, double_quant, dtype, k):
    tensors, theirs = bnb_layer(_weight(k=k, dtype=dtype, seed=3), quant_type, double_quant)
    assert theirs.dtype == dtype
    layer = bitsandbytes.convert(tensors, CONFIG, in_features=k, out_features=48, where="l")
    assert layer.scheme == f"bnb-{quant_type}{'-dq' if double_quant else ''}"
    assert torch.equal(layer.packed["qweight"], tensors["weight"].reshape(-1))  # the same bytes
    assert torch.equal(layer.packed["absmax"], tensors["weight.absmax"])
    ours = layer.dequantized_weight()
    assert ours.dtype == torch.float32 and torch.equal(ours.to(dtype), theirs)
    if k == 70:  # bitsandbytes' own CPU dequantize_4bit reads this shape in the flat order too
        import bitsandbytes.functional as F

        state = F.QuantState.from_dict({key.removeprefix("weight."): value for key, value in tensors.items()
                                        if key != "weight"}, device=torch.device("cpu"))  # fmt: skip
        assert torch.equal(ours.to(dtype), F.dequantize_4bit(tensors["weight"], state))
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer.module()(x), x @ ours.t(), rtol=1e-5, atol=1e-5)


def test_blocks_crossing_rows_and_other_blocksizes_and_storage_dtypes_load():
    cases = [(96, 64, torch.uint8, "bnb-nf4"), (100, 128, torch.uint8, "bnb-nf4-b128"),
             (192, 64, torch.bfloat16, "bnb-nf4"), (33, 32, torch.uint8, "bnb-nf4-b32")]
    for k, block, storage, scheme in cases:
        tensors, theirs = bnb_layer(_weight(n=9, k=k, seed=k), "nf4", False, blocksize=block, storage=storage)
        layer = bitsandbytes.convert(tensors, CONFIG, in_features=k, out_features=9, where="l")
        assert layer.scheme == scheme and layer.packed["qweight"].dtype == torch.uint8
        assert torch.equal(layer.dequantized_weight(), theirs), (k, block, storage)


def test_4bit_refusals_name_the_tensor():
    tensors, _ = bnb_layer(_weight(), "nf4", True)
    foreign = dict(tensors, **{"weight.quant_map": tensors["weight.quant_map"].flip(0)})
    with pytest.raises(CheckpointError, match=r"mlp\.weight\.quant_map: differs from the nf4 table"):
        bitsandbytes.convert(foreign, CONFIG, where="mlp")
    foreign = dict(tensors, **{"weight.nested_quant_map": tensors["weight.nested_quant_map"] * 0.5})
    with pytest.raises(CheckpointError, match=r"mlp\.weight\.nested_quant_map: differs from bitsandbytes' 8-bit "):
        bitsandbytes.convert(foreign, CONFIG, where="mlp")
    with pytest.raises(CheckpointError, match=r"mlp\.weight\.quant_state: shape \[48, 192\], the model's layer is "
                                              r"\[48, 128\]"):  # fmt: skip
        bitsandbytes.convert(tensors, CONFIG, in_features=128, out_features=48, where="mlp")
    short = dict(tensors, **{"weight.absmax": tensors["weight.absmax"][:-1]})
    with pytest.raises(CheckpointError, match=r"mlp\.weight\.absmax: is uint8\[143\], expected uint8\[144\]"):
        bitsandbytes.convert(short, CONFIG, where="mlp")
    short = dict(tensors, weight=tensors["weight"][:-1])
    with pytest.raises(CheckpointError, match=r"mlp\.weight: holds 4607 bytes, expected 4608"):
        bitsandbytes.convert(short, CONFIG, where="mlp")


@pytest.mark.parametrize("threshold, scheme", [(6.0, "llm-int8"), (4.5, "llm-int8-t4.5")])
def test_8bit_layer_keeps_cb_and_scb_and_matches_linear8bitlt(threshold, scheme):
    w, bias = _weight(n=40, k=96, seed=4) * 20, torch.randn(40, generator=torch.Generator().manual_seed(5))
    tensors, theirs = bnb_int8_layer(w, threshold)
    assert set(tensors) == {"weight", "SCB", "weight_format"}
    layer = bitsandbytes.convert(dict(tensors, bias=bias), dict(CONFIG_8BIT, llm_int8_threshold=threshold),
                                 in_features=96, out_features=40, where="l")  # fmt: skip
    assert layer.scheme == scheme
    assert torch.equal(layer.packed["qweight"], tensors["weight"]) and torch.equal(layer.packed["scales"],
                                                                                    tensors["SCB"])  # fmt: skip
    assert torch.equal(layer.dequantized_weight(), theirs)
    x = torch.randn(1, 5, 96, generator=torch.Generator().manual_seed(6))
    x[..., 3] *= 10  # outlier columns
    x[0, 0, 50] = 7.0
    with torch.no_grad():
        reference = bnb_int8_module(w, bias, threshold)(x)
        ours = layer.module()(x)
    assert (ours - reference).abs().max() <= 4e-5 * reference.abs().max()  # see tests/schemes/test_llm_int8.py


def test_8bit_refusals_name_the_key():
    tensors, _ = bnb_int8_layer(_weight(n=8, k=64))
    with pytest.raises(CheckpointError, match=r"llm_int8_has_fp16_weight=True"):
        bitsandbytes.layers([], dict(CONFIG_8BIT, llm_int8_has_fp16_weight=True))
    with pytest.raises(CheckpointError, match=r"mlp: llm_int8_threshold=0\.0: llm-int8: the outlier threshold must "
                                              r"be a finite number > 0"):  # fmt: skip
        bitsandbytes.convert(tensors, dict(CONFIG_8BIT, llm_int8_threshold=0.0), where="mlp")
    column = dict(tensors, weight_format=torch.tensor(1, dtype=torch.uint8))
    with pytest.raises(CheckpointError, match=r"mlp\.weight_format: 1, only 0 \(row-major\) is read"):
        bitsandbytes.convert(column, CONFIG_8BIT, where="mlp")
    with pytest.raises(CheckpointError, match=r"mlp\.SCB: is float32\[7\], expected float32\[8\]"):
        bitsandbytes.convert(dict(tensors, SCB=tensors["SCB"][:-1]), CONFIG_8BIT, where="mlp")
    with pytest.raises(CheckpointError, match=r"mlp\.weight: shape \[8, 64\], the model's layer is \[8, 32\]"):
        bitsandbytes.convert(tensors, CONFIG_8BIT, in_features=32, out_features=8, where="mlp")


def test_tiny_llama_4bit_checkpoint_gives_the_dequantized_float_models_logits(tmp_path):
    """Blocks of 128: the down projections (K = 192) have blocks crossing rows."""
    model = tiny_llama(seed=2)
    config = dict(CONFIG, bnb_4bit_quant_type="fp4")
    reference = write_checkpoint(model, tmp_path, config, lambda name, w: bnb_layer(w, "fp4", True, blocksize=128))
    loaded = load(tmp_path, dtype=torch.float32)
    assert [scheme for _, scheme, _ in loaded.qcompile_import] == ["bnb-fp4-dq-b128"] * 14
    torch.testing.assert_close(logits(loaded), logits(reference), rtol=1e-4, atol=1e-4)


def test_tiny_llama_8bit_checkpoint_gives_linear8bitlts_logits(tmp_path):
    model = tiny_llama(seed=3)
    write_checkpoint(model, tmp_path, CONFIG_8BIT, lambda name, w: bnb_int8_layer(w * 30))
    reference = copy.deepcopy(model)
    for index, layer in enumerate(reference.model.layers):
        for part in LLAMA_LINEARS:
            parent, _, attr = f"model.layers.{index}.{part}".rpartition(".")
            weight = reference.get_submodule(f"{parent}.{attr}").weight.detach() * 30
            setattr(reference.get_submodule(parent), attr, bnb_int8_module(weight, None, 6.0))
    loaded = load(tmp_path, dtype=torch.float32)
    assert [scheme for _, scheme, _ in loaded.qcompile_import] == ["llm-int8"] * 14
    with torch.no_grad():
        ours, theirs = logits(loaded), logits(reference)
    assert (ours - theirs).abs().max() <= 1e-3 * theirs.abs().max()
