"""SpQR import: a tiny Llama checkpoint written with transformers' ``SpQRConfig`` and ``spqr_quant``'s tensor names
(filled by qcompile's ``spqr-3`` quantizer: the layout is the same, see ``tests/schemes/test_spqr.py`` for its check
against ``spqr_quant``) loads to the logits of the float model holding the dequantized weights; layers without
outliers or permutation as ``spqr_quant`` stores them (an empty float ``col_vals``, an empty ``in_perm``) load;
tensors that disagree with each other or with the config are refused by name."""

from __future__ import annotations

import pytest
import torch

from import_writers import logits, tiny_llama, write_checkpoint
from qcompile.hf.checkpoints import CheckpointError, load, spqr
from qcompile.schemes import parse_scheme

SCHEME = parse_scheme("spqr-3")
CONFIG = {"quant_method": "spqr", "bits": 3, "beta1": 16, "beta2": 16}


def spqr_layer(weight: torch.Tensor, seed: int, threshold: float | None = 0.05, permute: bool = True):
    """``({dense_weights, row_offsets, col_vals, in_perm}, dequantized weight)`` as a SpQR checkpoint stores a
    layer; without outliers ``col_vals`` is ``spqr_quant``'s empty float tensor, without permutation ``in_perm`` is
    empty."""
    n, k = weight.shape
    kp = SCHEME.padded_in_features(k)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed)) if permute else torch.arange(k)
    perm = torch.cat([perm, torch.arange(k, kp)])
    q = SCHEME.quantize(weight[:, perm[:k]], outlier_threshold=threshold)
    q.perm = perm
    packed = SCHEME.pack(q)
    tensors = packed.tensors()
    if q.nnz == 0:
        tensors["col_vals"] = torch.zeros(0)
    if not permute:
        tensors["in_perm"] = torch.zeros(0, dtype=torch.int32)
    return tensors, SCHEME.dequantize_packed(packed, n, k)


def test_tiny_llama_checkpoint_gives_the_dequantized_float_models_logits(tmp_path):
    model = tiny_llama(seed=0)
    shapes = {}

    def layer(name, weight):
        plain = name.endswith("k_proj")  # no outliers, no permutation
        tensors, w = spqr_layer(weight, seed=len(name), threshold=None if plain else 0.05, permute=not plain)
        shapes.update({f"{name}.{key}.shape": value.numel() for key, value in tensors.items()})
        return tensors, w

    config = {**CONFIG, "shapes": shapes, "modules_to_not_convert": ["lm_head"]}
    reference = write_checkpoint(model, tmp_path, config, layer)
    loaded = load(tmp_path, dtype=torch.float32)
    assert {scheme for _, scheme, _ in loaded.qcompile_import} == {"spqr-3"}
    assert len(loaded.qcompile_import) == 14
    down = loaded.model.layers[1].mlp.down_proj
    assert down.col_vals.numel() > 0  # outliers arrived
    torch.testing.assert_close(logits(loaded), logits(reference), rtol=1e-4, atol=1e-4)


def _layer(n=32, k=48, threshold=0.05):
    return spqr_layer(torch.randn(n, k, generator=torch.Generator().manual_seed(1)), seed=2, threshold=threshold)


def test_layer_keeps_the_tensors_exactly():
    tensors, w = _layer()
    imported = spqr.convert(tensors, CONFIG, in_features=48, out_features=32, where="layers.0.q")
    assert imported.scheme == "spqr-3" and imported.permutation is None
    for key in ("dense_weights", "row_offsets", "col_vals", "in_perm"):
        assert torch.equal(imported.packed[key], tensors[key]), key
    assert torch.equal(imported.dequantized_weight(), w)


def test_col_vals_that_disagree_with_row_offsets_are_refused_naming_them():
    tensors, _ = _layer()
    short = {**tensors, "col_vals": tensors["col_vals"][:-2]}
    with pytest.raises(CheckpointError, match="layers.0.q: row_offsets must rise from 0 to the length of col_vals"):
        spqr.convert(short, CONFIG, in_features=48, out_features=32, where="layers.0.q")


def test_outlier_column_past_in_features_is_refused_naming_col_vals():
    tensors, _ = spqr_layer(torch.randn(32, 40, generator=torch.Generator().manual_seed(3)), seed=4)
    col_vals = tensors["col_vals"].clone()
    col_vals[1] = (col_vals[1] & ~0xFFFF) | 100  # column 100 >= Kp = 48
    with pytest.raises(CheckpointError, match=r"layers.1.o: col_vals\[1\] has column 100, which is no input"):
        spqr.convert({**tensors, "col_vals": col_vals}, CONFIG, in_features=40, out_features=32, where="layers.1.o")
    col_vals[1] = (col_vals[1] & ~0xFFFF) | 44  # a padding feature (K = 40)
    with pytest.raises(CheckpointError, match=r"col_vals\[1\] has column 44, which is no input feature \(K=40"):
        spqr.convert({**tensors, "col_vals": col_vals}, CONFIG, in_features=40, out_features=32, where="layers.1.o")


def test_config_and_layouts_that_are_not_spqr_3_are_refused():
    tensors, _ = _layer()
    with pytest.raises(CheckpointError, match="bits=4 is not supported"):
        spqr.convert(tensors, {**CONFIG, "bits": 4}, in_features=48, out_features=32, where="l")
    with pytest.raises(CheckpointError, match="beta1=32 is not supported"):
        spqr.convert(tensors, {**CONFIG, "beta1": 32}, in_features=48, out_features=32, where="l")
    ptcsr = {**tensors, "row_offsets": torch.zeros(3, dtype=torch.int32)}
    with pytest.raises(CheckpointError, match="l.row_offsets: 3 entries is spqr_quant's 'ptcsr'"):
        spqr.convert(ptcsr, CONFIG, in_features=48, out_features=32, where="l")
    with pytest.raises(CheckpointError, match=r"l.dense_weights: is int64\[64\], expected int64\[96\]"):
        spqr.convert({**tensors, "dense_weights": tensors["dense_weights"][:64]}, CONFIG, in_features=48,
                     out_features=32, where="l")  # fmt: skip
    with pytest.raises(CheckpointError, match="l.in_perm"):
        spqr.convert({**tensors, "in_perm": tensors["in_perm"].long()}, CONFIG, in_features=48, out_features=32,
                     where="l")  # fmt: skip
