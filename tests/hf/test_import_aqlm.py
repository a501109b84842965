"""AQLM import: layers built with the peer ``aqlm`` package's own ``QuantizedLinear`` (its parameter layout and
``pack_int_data`` code storage, random codes over the whole range) load into qcompile layers whose outputs equal the
package's forward (``aqlm-1x16`` on CPU: its ``dequantize_gemm``) or its dequantized weight through ``F.linear``; a
tiny Llama AQLM checkpoint loads to the reference model's logits; mismatched tensors and configs are refused by
name."""

from __future__ import annotations

import pytest
import torch

from import_writers import logits, tiny_llama, write_checkpoint
from qcompile.hf.checkpoints import CheckpointError, aqlm, load


def _config(m, b, ig=8):
    return {"quant_method": "aqlm", "in_group_size": ig, "out_group_size": 1, "num_codebooks": m,
            "nbits_per_codebook": b, "linear_weights_not_to_quantize": ["model.embed_tokens.weight", "lm_head.weight"]}


def _peer_layer(n, k, m, b, ig=8, bias=False, seed=0, dtype=torch.float16):
    """The peer's ``QuantizedLinear`` with random codes (stored by ``pack_int_data``), codebooks and scales."""
    from aqlm import QuantizedLinear
    from aqlm.utils import pack_int_data

    g = torch.Generator().manual_seed(seed)
    layer = QuantizedLinear(k, n, in_group_size=ig, out_group_size=1, num_codebooks=m, nbits_per_codebook=b,
                            bias=bias, dtype=dtype)  # fmt: skip
    with torch.no_grad():
        layer.codes.copy_(pack_int_data(torch.randint(0, 2**b, tuple(layer.codes.shape), generator=g), b))
        layer.codebooks.copy_(torch.randn(layer.codebooks.shape, generator=g) * 0.1)
        layer.scales.copy_(torch.rand(layer.scales.shape, generator=g) + 0.5)
        if bias:
            layer.bias.copy_(torch.randn(n, generator=g))
    return layer


def _peer_weight(layer) -> torch.Tensor:
    """The peer's own dequantization (``dequantize_gemm``'s weight), in float32."""
    from aqlm.utils import _dequantize_weight, unpack_int_data

    return _dequantize_weight(unpack_int_data(layer.codes, layer.nbits_per_codebook), layer.codebooks.float(),
                              layer.scales.float())  # fmt: skip


def test_layer_equals_the_aqlm_packages_forward():
    """aqlm-1x16 with a bias: the package's ``QuantizedLinear.forward`` on CPU (float32) against the imported layer."""
    peer = _peer_layer(24, 64, 1, 16, bias=True)
    tensors = {name: t.detach() for name, t in peer.state_dict().items()}
    layer = aqlm.convert(tensors, _config(1, 16), in_features=64, out_features=24, where="mlp.up_proj")
    assert layer.scheme == "aqlm-1x16" and layer.notes == ()
    assert torch.equal(layer.packed["codes"], peer.codes)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    expected = peer.float()(x)  # the package's forward: dequantize_gemm on CPU for 65536-entry codebooks
    torch.testing.assert_close(layer.module()(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.dequantized_weight(), _peer_weight(peer), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("m, b, ig", [(2, 8, 8), (1, 8, 4), (3, 4, 8)])
def test_layer_equals_the_packages_dequantized_weight(m, b, ig):
    peer = _peer_layer(16, 96, m, b, ig, seed=m)
    layer = aqlm.convert({n: t.detach() for n, t in peer.state_dict().items()}, _config(m, b, ig), in_features=96,
                         out_features=16)  # fmt: skip
    torch.testing.assert_close(layer.dequantized_weight(), _peer_weight(peer), rtol=1e-6, atol=1e-6)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(layer.module()(x), torch.nn.functional.linear(x, _peer_weight(peer)), rtol=1e-5,
                               atol=1e-5)  # fmt: skip


def test_tiny_llama_checkpoint_gives_the_packages_logits(tmp_path):
    model = tiny_llama(seed=1, tie=False)
    layers = {}

    def layer_fn(name, w):
        peer = _peer_layer(w.shape[0], w.shape[1], 2, 8, seed=len(layers))
        layers[name] = peer
        return {n: t.detach() for n, t in peer.state_dict().items()}, _peer_weight(peer)

    reference = write_checkpoint(model, tmp_path, _config(2, 8), layer_fn)
    loaded = load(tmp_path, dtype=torch.float32)
    assert [scheme for _, scheme, _ in loaded.qcompile_import] == ["aqlm-2x8"] * 14
    assert type(loaded.lm_head) is torch.nn.Linear
    torch.testing.assert_close(logits(loaded), logits(reference), rtol=1e-4, atol=1e-4)


def test_mismatches_are_refused_by_name():
    peer = _peer_layer(16, 64, 2, 8)
    tensors = {name: t.detach() for name, t in peer.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"o_proj\.codes: is int8\[16, 8, 2\], expected int8\[16, 10, 2\] "
                                              r"\(aqlm-2x8: .*K=80\]\)"):  # fmt: skip
        aqlm.convert(tensors, _config(2, 8), in_features=80, out_features=16, where="o_proj")
    with pytest.raises(CheckpointError, match=r"o_proj\.codes: is int8\[16, 8, 2\], expected int16"):
        aqlm.convert(tensors, _config(2, 16), in_features=64, out_features=16, where="o_proj")
    with pytest.raises(CheckpointError, match=r"o_proj: AQLM out_group_size=2 is not supported"):
        aqlm.convert(tensors, {**_config(2, 8), "out_group_size": 2}, where="o_proj")
    with pytest.raises(CheckpointError, match=r"o_proj: in_features K=60 is not a multiple of in_group_size=8"):
        aqlm.convert(tensors, _config(2, 8), in_features=60, out_features=16, where="o_proj")
    with pytest.raises(CheckpointError, match=r"o_proj\.codebooks: float32 values that float16 does not hold"):
        aqlm.convert({**tensors, "codebooks": tensors["codebooks"].float() + 1e-6}, _config(2, 8), where="o_proj")
    exact = aqlm.convert({**tensors, "scales": tensors["scales"].float()}, _config(2, 8), where="o_proj")
    assert exact.notes == ("scales float32 → float16 (exact)",) and exact.packed["scales"].dtype == torch.float16
