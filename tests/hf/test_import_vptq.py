"""VPTQ import: layers built with the peer ``vptq`` package's own ``VQuantLinear`` (loaded from its file, see
``vptq_peer``; indices packed by its ``pack_index``, random over their whole range) load into qcompile layers whose
weight equals the package's Python dequantization (``vptq/ops/quant_gemm.py: dequant``, what its ``quant_gemm`` runs
without CUDA kernels) and whose outputs equal ``F.linear`` with it; a tiny Llama VPTQ checkpoint loads to the logits
of the model holding those weights; lying shapes and configs are refused by name."""

from __future__ import annotations

import pytest
import torch

import vptq_peer
from import_writers import logits, tiny_llama, write_checkpoint
from qcompile.hf.checkpoints import CheckpointError, load, vptq


def _tensors(layer):
    return {name.removesuffix(".weight") if name.endswith("centroids.weight") else name: t.detach()
            for name, t in layer.state_dict().items()}  # fmt: skip


@pytest.mark.parametrize("args, scheme", [
    ((24, 64, 8, 256), "vptq-v8-k256"),
    ((21, 50, 4, 64, 16, 8), "vptq-v4-k64-r16-o8"),
    ((13, 40, 1, 16, 4), "vptq-v1-k16-r4"),
    ((30, 70, 6, 4096, 256), "vptq-v6-k4096-r256"),
])  # fmt: skip
def test_layer_equals_the_packages_dequantization(args, scheme):
    peer, config = vptq_peer.random_layer(*args, bias=True, seed=len(args))
    n, k = args[0], args[1]
    layer = vptq.convert(_tensors(peer), config, in_features=k, out_features=n, where="mlp.up_proj")
    assert layer.scheme == scheme and layer.notes == ()
    expected = vptq_peer.layer_weight(peer)
    torch.testing.assert_close(layer.dequantized_weight(), expected, rtol=1e-6, atol=1e-6)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer.module()(x), torch.nn.functional.linear(x, expected, peer.bias.float()),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_norm_and_perm_disabled_become_unit_scale_and_identity():
    peer, config = vptq_peer.random_layer(16, 48, 8, 64, norm=False, perm=False)
    layer = vptq.convert(_tensors(peer), config, in_features=48, out_features=16)
    assert layer.notes == ("enable_norm=false: weight_scale 1, weight_bias 0",
                           "enable_perm=false: identity permutation")
    torch.testing.assert_close(layer.dequantized_weight(), vptq_peer.layer_weight(peer), rtol=0, atol=0)


def test_tiny_llama_checkpoint_gives_the_packages_logits(tmp_path):
    model = tiny_llama(seed=1, tie=False)
    layers = {}

    def layer_fn(name, w):
        peer, config = vptq_peer.random_layer(w.shape[0], w.shape[1], 8, 256, 16, seed=len(layers))
        layers[name] = config
        return {n: t.detach() for n, t in peer.state_dict().items()}, vptq_peer.layer_weight(peer)

    qconfig = {"quant_method": "vptq", "config_for_layers": layers, "shared_layer_config": {}}
    reference = write_checkpoint(model, tmp_path, qconfig, layer_fn)
    loaded = load(tmp_path, dtype=torch.float32)
    assert [scheme for _, scheme, _ in loaded.qcompile_import] == ["vptq-v8-k256-r16"] * 14
    assert type(loaded.lm_head) is torch.nn.Linear
    torch.testing.assert_close(logits(loaded), logits(reference), rtol=1e-4, atol=1e-4)


def test_shared_layer_config_is_found_by_the_layers_last_name():
    cfg = {"q_proj": {"vector_lens": [-1, 8]}}
    assert vptq.layer_config("model.layers.0.self_attn.q_proj", {"shared_layer_config": cfg}) == cfg["q_proj"]


def test_lying_shapes_and_configs_are_refused_by_name():
    peer, config = vptq_peer.random_layer(21, 50, 4, 64, 16, 8)
    tensors = _tensors(peer)
    with pytest.raises(CheckpointError, match=r"o_proj\.indices: is int32\[1, 6, 14\], expected int32\[1, 6, 15\] "
                                              r"\(vptq-v4-k64-r16-o8: \[N=21, K=54\]\)"):  # fmt: skip
        vptq.convert(tensors, {**config, "group_size": 46}, in_features=54, out_features=21, where="o_proj")
    with pytest.raises(CheckpointError, match=r"o_proj\.indices: is int32\[1, 6, 14\], expected int32\[1, 8, 14\]"):
        vptq.convert(tensors, config, in_features=50, out_features=29, where="o_proj")
    with pytest.raises(CheckpointError, match=r"o_proj\.res_centroids: is float16\[1, 60\], expected "):
        vptq.convert({**tensors, "res_centroids": tensors["res_centroids"][:, :60]}, config, in_features=50,
                     out_features=21, where="o_proj")  # fmt: skip
    with pytest.raises(CheckpointError, match=r"o_proj\.perm: is int16\[49\]"):
        vptq.convert({**tensors, "perm": tensors["perm"][:49]}, config, in_features=50, out_features=21,
                     where="o_proj")  # fmt: skip
    with pytest.raises(CheckpointError, match=r"o_proj\.perm: not a permutation of 0\.\.49"):
        bad = tensors["perm"].clone()
        bad[0] = bad[1]
        vptq.convert({**tensors, "perm": bad}, config, in_features=50, out_features=21, where="o_proj")
    with pytest.raises(CheckpointError, match=r"o_proj\.outlier_indices: holds 64, past the 64"):
        bad = tensors["outlier_indices"].clone()
        bad[0, 0, 0] = 64
        vptq.convert({**tensors, "outlier_indices": bad}, config, in_features=50, out_features=21, where="o_proj")
    with pytest.raises(CheckpointError, match=r"o_proj: VPTQ group_num=2 is not supported"):
        vptq.convert(tensors, {**config, "group_num": 2}, in_features=50, out_features=21, where="o_proj")
    with pytest.raises(CheckpointError, match=r"o_proj: VPTQ outliers with vector length 8 and 64 centroids"):
        vptq.convert(tensors, {**config, "vector_lens": [8, 4]}, in_features=50, out_features=21, where="o_proj")
    with pytest.raises(CheckpointError, match=r"o_proj\.centroids: float32 values that float16 does not hold"):
        vptq.convert({**tensors, "centroids": tensors["centroids"].float() + 1e-6}, config, in_features=50,
                     out_features=21, where="o_proj")  # fmt: skip
