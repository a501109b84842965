"""The AQLM scheme (``qcompile.schemes.aqlm``) against the peer ``aqlm`` package (1.1.7): its dequantization
(``utils._dequantize_weight`` of ``unpack_int_data`` codes, what ``dequantize_gemm`` multiplies with) and its code
storage (``pack_int_data``); names, bits per weight (codebooks counted), pack / unpack, ragged K, the data-free
quantizer's determinism and error."""

from __future__ import annotations

import pytest
import torch

from qcompile.schemes import PackedWeight, parse_scheme
from qcompile.schemes.aqlm import Aqlm, unwrap_codes, wrap_codes

# (name, M, B, ig): every code width the storage has (int8 up to 8 bits, int16 above), one to three codebooks
FORMS = [("aqlm-1x16", 1, 16, 8), ("aqlm-2x8", 2, 8, 8), ("aqlm-1x8-g4", 1, 8, 4), ("aqlm-3x4-g2", 3, 4, 2),
         ("aqlm-2x12-g5", 2, 12, 5)]  # fmt: skip


def _random_layer(m, b, ig, n, k, seed=0):
    """Unsigned codes over the whole range, float16 codebooks and scales (some negative), as the peer stores them."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**b, (n, k // ig, m), generator=g)
    books = (torch.randn(m, 2**b, 1, ig, generator=g) * 0.3).half()
    scales = (torch.rand(n, 1, 1, 1, generator=g) + 0.5).half()
    scales[1] = -scales[1]
    return codes, books, scales


@pytest.mark.parametrize("name, m, b, ig", FORMS)
def test_decode_is_the_aqlm_packages_dequantization(name, m, b, ig):
    from aqlm.utils import _dequantize_weight, pack_int_data, unpack_int_data

    n, k = 13, 10 * ig
    codes, books, scales = _random_layer(m, b, ig, n, k)
    stored = pack_int_data(codes.clone(), b)
    assert torch.equal(wrap_codes(codes, b), stored) and stored.dtype == (torch.int8 if b <= 8 else torch.int16)
    assert torch.equal(unwrap_codes(stored, b), unpack_int_data(stored, b))
    scheme = parse_scheme(name)
    ours = scheme.dequantize_packed([stored, books, scales], n, k)
    peer = _dequantize_weight(unpack_int_data(stored, b), books.float(), scales.float())
    assert peer.shape == ours.shape == (n, k)
    torch.testing.assert_close(ours, peer, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name, m, b, ig", FORMS)
def test_names_round_trip(name, m, b, ig):
    scheme = parse_scheme(name)
    assert isinstance(scheme, Aqlm) and (scheme.num_codebooks, scheme.bits, scheme.group_size) == (m, b, ig)
    assert scheme.name == name and parse_scheme(f"aqlm-{m}x{b}-g{ig}") == scheme


@pytest.mark.parametrize("name, message", [("aqlm-2x8-g", "malformed aqlm name"), ("aqlm-0x8", "codebooks must be"),
                                           ("aqlm-1x17", "bits per code must be"), ("aqlm-1x8-g33", "group size")])
def test_bad_names_are_refused(name, message):
    with pytest.raises(ValueError, match=message):
        parse_scheme(name)


@pytest.mark.parametrize("name, n, k, bits", [
    ("aqlm-1x16", 4096, 4096, 2 + 65536 * 8 * 16 / 4096**2 + 16 / 4096),  # 2.50391: the 1 MiB codebook is 0.5
    ("aqlm-2x8", 4096, 4096, 2 + 2 * 256 * 8 * 16 / 4096**2 + 16 / 4096),  # 2.00781
    ("aqlm-1x16", 576, 576, 2 + 65536 * 8 * 16 / 576**2 + 16 / 576),  # 27.3: the codebook dominates a small layer
    ("aqlm-1x8-g4", 64, 100, (64 * 25 * 8 + 256 * 4 * 16 + 64 * 16) / (64 * 100)),
    ("aqlm-2x8", 10, 197, (10 * 25 * 2 * 8 + 2 * 256 * 8 * 16 + 10 * 16) / (10 * 197)),  # K padded to 200
])  # fmt: skip
def test_bits_per_weight_count_codes_codebooks_and_scales(name, n, k, bits):
    assert parse_scheme(name).bits_per_weight(n, k) == pytest.approx(bits, rel=1e-12)


@pytest.mark.parametrize("name", ["aqlm-2x8", "aqlm-1x8-g4", "aqlm-1x16"])
def test_pack_unpack_round_trip_on_ragged_k(name):
    scheme = parse_scheme(name)
    n, k = 37, 197
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    q = scheme.quantize(w)
    packed = scheme.pack(q)
    assert [t.dtype for t in packed.list()] == [torch.int8 if scheme.bits <= 8 else torch.int16, torch.float16,
                                                torch.float16]  # fmt: skip
    assert packed.nbytes == scheme.packed_nbytes(n, k)
    back = scheme.unpack(PackedWeight(packed.tensors()), k)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.codebooks, q.codebooks)
    assert torch.equal(back.scales, q.scales) and back.in_features == k
    assert (q.codes >= 0).all() and (q.codes < scheme.entries).all()
    w_hat = scheme.dequantize(q)
    assert w_hat.shape == (n, k) and torch.equal(w_hat, scheme.dequantize_packed(packed.list(), n, k))


def test_data_free_quantization_is_deterministic_and_fits():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(2))
    scheme = parse_scheme("aqlm-2x8")
    one, two = scheme.quantize(w), scheme.quantize(w)
    assert torch.equal(one.codes, two.codes) and torch.equal(one.codebooks, two.codebooks)
    error = (scheme.dequantize(one) - w).norm() / w.norm()
    # 2 codebooks of 256 for 768 groups of 8: far below round to nearest on 2 bits (int2-g16: about 0.4)
    rtn = parse_scheme("int2-g16")
    assert error < 0.3 < (rtn.dequantize(rtn.quantize(w)) - w).norm() / w.norm()


def test_one_codebook_with_an_entry_per_group_is_exact_up_to_float16():
    """aqlm-1x16 on a small layer: every group is its own entry, only the float16 roundings remain."""
    w = torch.randn(20, 64, generator=torch.Generator().manual_seed(3))
    scheme = parse_scheme("aqlm-1x16")
    error = (scheme.dequantize(scheme.quantize(w)) - w).abs().max() / w.abs().max()
    assert error < 2e-3


def test_wrong_code_dtype_is_refused_by_name():
    scheme = parse_scheme("aqlm-1x16")
    codes, books, scales = _random_layer(1, 16, 8, 4, 16)
    with pytest.raises(ValueError, match=r"codes is int8\[4, 2, 1\], expected int16\[4, 2, 1\]"):
        scheme.check_packed([codes.to(torch.int8), books, scales], 4, 16, where="layer")
    with pytest.raises(ValueError, match="codes is int32"):
        scheme.unpack(PackedWeight({"codes": codes.int(), "codebooks": books, "scales": scales}), 16)


def test_onnx_export_is_a_clear_error_naming_the_layer():
    from qcompile.onnx.base import ExportOptions, OnnxExportError
    from qcompile.onnx.families import lower_site

    scheme = parse_scheme("aqlm-2x8")
    codes, books, scales = _random_layer(2, 8, 8, 8, 64)
    packed = PackedWeight({"codes": wrap_codes(codes, 8), "codebooks": books, "scales": scales})
    with pytest.raises(OnnxExportError) as error:
        lower_site("model.layers.3.mlp.up_proj", scheme, packed, 64, ExportOptions())
    for word in ("model.layers.3.mlp.up_proj", "aqlm-2x8", "no ONNX translation"):
        assert word in str(error.value)
