"""The VPTQ scheme: names, geometry and bits per weight, the bitstream against the peer package's own ``pack_index``
(loaded from its file, ``tests/hf/vptq_peer.py``), its packed weight against the package's ``dequant``, data-free
quantization (deterministic, error falls with more centroids / a residual)."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "hf"))
import vptq_peer  # noqa: E402
from qcompile.schemes import parse_scheme  # noqa: E402
from qcompile.schemes.vptq import pack_bits, unpack_bits  # noqa: E402


def test_names_round_trip_and_bad_ones_are_refused():
    for name in ("vptq-v8-k256", "vptq-v8-k65536-r256", "vptq-v4-k64-r16-o8", "vptq-v1-k16"):
        assert parse_scheme(name).name == name
    for bad, match in (("vptq-v8-k100", "power of two"), ("vptq-v8-k64-r128", r"2\.\.64"),
                       ("vptq-v40-k64", "1..32"), ("vptq-k64", "malformed")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            parse_scheme(bad)
    with pytest.raises(ValueError, match="K=8 input columns leave none after the 8 outlier columns"):
        parse_scheme("vptq-v4-k64-o8").tensors(16, 8)


def test_bits_per_weight_counts_indices_codebooks_and_norms():
    s = parse_scheme("vptq-v8-k65536-r256")
    n = k = 4096
    index = 512 * (-(-4096 * 24 // 32)) * 32
    books = 16 * (65536 + 256) * 8
    assert s.bits_per_weight(n, k) == (index + books + 48 * k) / (n * k)
    assert 3.5 < s.bits_per_weight(n, k) < 3.52  # 3 (indices) + 0.5 (codebooks) + 0.012 (norms, perm)


@pytest.mark.parametrize("bits, res_bits", [(8, 0), (6, 4), (12, 8), (16, 16)])
def test_bitstream_is_the_packages_pack_index(bits, res_bits):
    g = torch.Generator().manual_seed(bits)
    main = torch.randint(0, 2**bits, (1, 5, 37), generator=g)
    res = torch.randint(0, 2**res_bits, (1, 5, 37), generator=g) if res_bits else None
    peer = vptq_peer.pack_index(main.to(torch.uint16).view(torch.int16), bits,
                                None if res is None else res.to(torch.uint16).view(torch.int16), res_bits,
                                index_dtype=torch.uint16)  # fmt: skip
    entries = main[0] if res is None else main[0] | (res[0] << bits)
    assert torch.equal(pack_bits(entries, bits + res_bits), peer[0])
    assert torch.equal(unpack_bits(peer[0], bits + res_bits, 37), entries)


@pytest.mark.parametrize("name", ["vptq-v8-k256", "vptq-v4-k64-r16-o8", "vptq-v3-k32-r8"])
def test_quantized_weight_equals_the_packages_dequant(name):
    """Our packed tensors put back into the package's ``VQuantLinear`` parameters dequantize to our weight."""
    s = parse_scheme(name)
    n, k = 21, 50
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    packed = s.pack(s.quantize(w))
    layer, _ = vptq_peer.random_layer(n, k, s.vector_len, s.centroids, s.res_centroids or -1, s.outliers)
    with torch.no_grad():
        layer.indices.data = packed["indices"].unsqueeze(0)
        layer.centroids.weight.copy_(packed["centroids"].reshape(1, -1))
        if s.res_centroids:
            layer.res_centroids.weight.copy_(packed["res_centroids"].reshape(1, -1))
        if s.outliers:
            layer.outlier_indices.data = packed["outlier_indices"].unsqueeze(0)
            layer.outlier_centroids.weight.copy_(packed["outlier_centroids"].reshape(1, -1))
        layer.weight_scale.copy_(packed["weight_scale"])
        layer.weight_bias.copy_(packed["weight_bias"])
        layer.perm.data = packed["perm"]
    torch.testing.assert_close(s.dequantize_packed(packed, n, k), vptq_peer.layer_weight(layer), rtol=0, atol=1e-6)


def test_data_free_quantization_is_deterministic_and_improves_with_codebook_size():
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(1))

    def error(name):
        s = parse_scheme(name)
        return float((s.dequantize(s.quantize(w)) - w).norm() / w.norm())

    a, b = (parse_scheme("vptq-v4-k64").pack(parse_scheme("vptq-v4-k64").quantize(w)).list() for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert error("vptq-v4-k256") < error("vptq-v4-k64") and error("vptq-v4-k64-r16") < error("vptq-v4-k64")


def test_onnx_export_is_a_clear_error_naming_the_layer():
    from qcompile.onnx.base import ExportOptions, OnnxExportError
    from qcompile.onnx.families import lower_site

    scheme = parse_scheme("vptq-v8-k256")
    packed = scheme.pack(scheme.quantize(torch.randn(16, 64, generator=torch.Generator().manual_seed(0))))
    with pytest.raises(OnnxExportError) as error:
        lower_site("model.layers.1.mlp.down_proj", scheme, packed, 64, ExportOptions())
    for word in ("model.layers.1.mlp.down_proj", "vptq-v8-k256", "no ONNX translation"):
        assert word in str(error.value)
