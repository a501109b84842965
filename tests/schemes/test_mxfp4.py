"""``mxfp4`` and the FP4 pieces it shares with ``nvfp4`` (E2M1 codes, nibble order, the Hadamard rotation), against
the definitions written out in ``fp4_definition.py`` and the peers compressed-tensors and gguf."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fp4_definition as spec
from qcompile.schemes import SchemeError, parse_scheme
from qcompile.schemes.fp4 import E2M1_VALUES, e2m1_decode, e2m1_encode, hadamard, pack_e2m1, rotate, unpack_e2m1
from qcompile.schemes.mxfp4 import MXFP4

SHAPES = [(5, 70), (33, 200)]


def _weight(n, k, seed):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1


# -- E2M1 --------------------------------------------------------------------------------------------------------
def test_e2m1_table():
    assert E2M1_VALUES == (0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6)
    codes = torch.arange(16, dtype=torch.uint8)
    assert e2m1_decode(codes).tolist() == [spec.e2m1_value(c) for c in range(16)]


# value -> code: ties to the even mantissa (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4),
# saturation at 6, the sign bit kept for values that round to 0
ROUNDING = [(0.25, 0), (0.2500001, 1), (0.75, 2), (0.7499999, 1), (1.25, 2), (1.75, 4), (2.5, 4), (2.5000002, 5),
            (3.5, 6), (5.0, 6), (5.0000005, 7), (6.0, 7), (100.0, 7), (float("inf"), 7), (-0.1, 8), (-0.0, 8),
            (0.0, 0), (-3.5, 14), (-7.0, 15), (1.4, 3)]  # fmt: skip


@pytest.mark.parametrize("value, code", ROUNDING)
def test_e2m1_rounding(value, code):
    assert e2m1_encode(torch.tensor([value], dtype=torch.float32)).item() == code
    if math.isfinite(value):
        assert spec.e2m1_code(value) == code


def test_e2m1_encode_matches_the_definition_on_random_values_and_every_midpoint():
    values = torch.randn(2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    mids = [(a + b) / 2 for a, b in zip(spec.LEVELS, spec.LEVELS[1:])]
    values = torch.cat([values, torch.tensor(mids + [-m for m in mids], dtype=torch.float64)])
    assert e2m1_encode(values).tolist() == [spec.e2m1_code(v) for v in values.tolist()]


def test_e2m1_and_nibble_order_match_compressed_tensors():
    """compressed-tensors' cast_to_fp4 then pack_fp4_to_uint8 writes the same bytes; its unpack reads ours back."""
    ct = pytest.importorskip("compressed_tensors.compressors.nvfp4.helpers")
    fp4 = pytest.importorskip("compressed_tensors.quantization.utils.fp4_utils")
    values = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)) * 3
    values[0, :14] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5])
    values[1, :4] = torch.tensor([-0.1, 0.1, 9.0, -9.0])
    ours = pack_e2m1(e2m1_encode(values))
    theirs = ct.pack_fp4_to_uint8(fp4.cast_to_fp4(values.clone()))
    assert torch.equal(ours, theirs)
    unpacked = ct.unpack_fp4_from_uint8(ours, 8, 64, dtype=torch.float32)
    assert torch.equal(unpacked, e2m1_decode(unpack_e2m1(ours, 64)))


def test_nibble_order():
    codes = torch.tensor([[1, 2, 15, 8, 0, 7]], dtype=torch.uint8)
    packed = pack_e2m1(codes)
    assert packed.tolist() == [[0x21, 0x8F, 0x70]]  # element 2j in the low nibble
    assert torch.equal(unpack_e2m1(packed, 6), codes)


# -- the Hadamard rotation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [16, 32, 64, 128])
def test_hadamard_is_the_normalized_sylvester_matrix(size):
    h = hadamard(size)
    np.testing.assert_array_equal(h.numpy(), spec.hadamard(size))
    assert torch.equal(h, h.t())
    torch.testing.assert_close(h @ h.t(), torch.eye(size, dtype=torch.float64), rtol=0, atol=1e-14)
    assert set(h.abs().unique().tolist()) == {1 / math.sqrt(size)}


def test_rotate_is_the_block_diagonal_matmul():
    x = torch.randn(3, 128, dtype=torch.float64)
    hb = torch.block_diag(*[hadamard(32)] * 4)
    torch.testing.assert_close(rotate(x, 32), x @ hb, rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="not a multiple of the Hadamard size 32"):
        rotate(torch.randn(2, 48), 32)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(24)


# -- names -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, activations, rotation, kp", [
    ("mxfp4", False, None, 96), ("mxfp4-had", False, 32, 96), ("mxfp4-had64", False, 64, 128),
    ("mxfp4-had128", False, 128, 128), ("mxfp4-w4a4", True, None, 96), ("mxfp4-w4a4-had", True, 32, 96),
    ("mxfp4-w4a4-had128", True, 128, 128),
])  # fmt: skip
def test_names_round_trip(name, activations, rotation, kp):
    scheme = parse_scheme(name)
    assert scheme == MXFP4(activations=activations, rotation=rotation) and scheme.name == name
    assert scheme.quantizes_activations == activations and scheme.padded_in_features(70) == kp
    assert parse_scheme("mxfp4-had32") == parse_scheme("mxfp4-had")  # the explicit default size is the same scheme


@pytest.mark.parametrize("name, words", [
    ("mxfp4-had16", ["Hadamard size 16", "32, 64, 128"]), ("mxfp4-had-w4a4", ["mxfp4[-w4a4][-had[<size>]]"]),
    ("mxfp4-w8a8", ["malformed"]), ("mxfp4-had48", ["Hadamard size 48"]),
])  # fmt: skip
def test_bad_names_say_what_is_wrong(name, words):
    with pytest.raises(SchemeError) as error:
        parse_scheme(name)
    for word in (name, *words):
        assert word in str(error.value)


def test_bits_per_weight_and_tensors():
    scheme = parse_scheme("mxfp4")
    assert scheme.bits_per_weight(64, 256) == 4.25
    specs = scheme.tensors(5, 70)
    assert [(s.name, s.shape, s.dtype) for s in specs] == [("qweight", (5, 48), torch.uint8),
                                                           ("scales", (5, 3), torch.uint8)]  # fmt: skip


# -- quantization against the definition -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mxfp4", "mxfp4-had", "mxfp4-had128"])
@pytest.mark.parametrize("n, k", SHAPES)
def test_quantize_matches_the_definition(name, n, k):
    scheme = parse_scheme(name)
    weight = _weight(n, k, seed=n)
    weight[0, :32] = 0.0  # an all-zero group: smallest scale, zero codes
    q = scheme.quantize(weight)
    kp = scheme.padded_in_features(k)
    rotated = spec.padded_rotated(weight.double().numpy(), kp, scheme.rotation)
    codes, scales = [], []
    for row in rotated:
        row32 = [spec.f32(v) for v in row]
        groups = [spec.mx_block(row32[g : g + 32]) for g in range(0, kp, 32)]
        scales.append([s for s, _ in groups])
        codes.append([c for _, block in groups for c in block])
    assert q.scales.tolist() == scales
    assert q.codes.tolist() == codes
    if scheme.rotation is None:
        assert q.scales[0, 0] == 0 and not q.codes[0, :32].any()
    # dequantize: code value * 2**(s - 127), then back to the input's basis
    values = np.array([[spec.e2m1_value(c) * 2.0 ** (scales[i][j // 32] - 127) for j, c in enumerate(row)]
                       for i, row in enumerate(codes)])  # fmt: skip
    if scheme.rotation:
        values = spec.padded_rotated(values, kp, scheme.rotation)  # Hb is symmetric and orthogonal
    torch.testing.assert_close(scheme.dequantize(q).double(), torch.from_numpy(values[:, :k]), rtol=1e-6, atol=1e-7)


def test_scale_range_is_clamped_and_never_nan():
    scheme = parse_scheme("mxfp4")
    weight = torch.zeros(3, 32)
    weight[0, 0] = 2.0**-140  # floor(log2) - 2 = -142: clamped to -127 (code 0)
    weight[1, 0] = 3.0e38  # 2**127.8: exponent 127 - 2 = 125
    weight[2, :] = torch.linspace(-1, 1, 32)
    q = scheme.quantize(weight)
    assert q.scales[:, 0].tolist() == [0, 125 + 127, 127 - 2 - 1 + 1]
    assert (q.scales != 255).all()


def test_saturation_of_the_largest_element():
    """amax = 7 * 2**e rounds to 6 * 2**e under the spec's floor rule (OCP MX v1.0, section 6.3)."""
    q = parse_scheme("mxfp4").quantize(torch.tensor([[7.0, 1.0] + [0.0] * 30]))
    assert q.scales.item() == 127 + 0 and q.codes[0, :2].tolist() == [7, 2]  # 7 / 2**0 -> 6, 1 -> 1


def test_matches_gguf_mxfp4_values():
    """gguf's MXFP4 (same scale rule; blocks of [E8M0, 16 bytes] with element i in the low nibble of byte i and
    element i + 16 in its high nibble) decodes to the same values; exact ties are not in random data (gguf breaks
    ties towards the smaller magnitude, see the next test)."""
    gguf = pytest.importorskip("gguf")
    weight = _weight(33, 256, seed=3)
    blocks = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.MXFP4).reshape(33, 8, 17)
    scheme = parse_scheme("mxfp4")
    q = scheme.quantize(weight)
    assert torch.equal(torch.from_numpy(blocks[:, :, 0].copy()), q.scales)
    theirs = gguf.quants.dequantize(blocks.reshape(33, -1), gguf.GGMLQuantizationType.MXFP4)
    assert torch.equal(torch.from_numpy(theirs), scheme.dequantize(q))


def test_ties_differ_from_gguf_by_design():
    gguf = pytest.importorskip("gguf")
    row = torch.tensor([[4.0, 0.75, 1.25, 2.5] + [0.0] * 28])  # scale 1: ties at 0.75, 1.25, 2.5
    theirs = gguf.quants.dequantize(gguf.quants.quantize(row.numpy(), gguf.GGMLQuantizationType.MXFP4),
                                    gguf.GGMLQuantizationType.MXFP4)  # fmt: skip
    ours = parse_scheme("mxfp4").dequantize(parse_scheme("mxfp4").quantize(row))
    assert ours[0, :4].tolist() == [4.0, 1.0, 1.0, 2.0]  # ties to the even mantissa
    assert theirs[0, :4].tolist() == [4.0, 0.5, 1.0, 2.0]  # argmin: the first (smaller) level


def test_compressed_tensors_mxfp4_rounds_its_scale_up_where_amax_has_mantissa_above_1_75():
    """compressed-tensors' MXFP4 observer rounds amax to a power of two before taking floor(log2): where amax's
    mantissa is >= 1.75 its exponent is one more than the spec's floor rule (so 7 * 2**e no longer saturates);
    elsewhere the scales and every code agree."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    weight = _weight(16, 256, seed=4)
    args = QuantizationArgs(num_bits=4, type="float", strategy="group", group_size=32, scale_dtype=torch.uint8)
    groups = weight.reshape(16, 8, 32)
    scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    theirs = MXFP4PackedCompressor.compress({"weight": weight, "weight_scale": scale},
                                            QuantizationScheme(targets=["Linear"], weights=args))  # fmt: skip
    packed = parse_scheme("mxfp4").pack(parse_scheme("mxfp4").quantize(weight))
    mantissa, _ = torch.frexp(groups.abs().amax(-1))  # in [0.5, 1): 2 * mantissa is amax's 1.m
    bump = (2 * mantissa >= 1.75).to(torch.uint8)
    assert bump.any() and not bump.all()
    assert torch.equal(theirs["weight_scale"], packed.scales + bump)
    same = (bump == 0).repeat_interleave(16, 1)  # 16 bytes per group of 32
    assert torch.equal(theirs["weight_packed"][same], packed.qweight[same])


# -- the reference matmul ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mxfp4", "mxfp4-had", "mxfp4-had64"])
def test_weight_only_reference_is_x_times_the_dequantized_weight(name):
    scheme = parse_scheme(name)
    weight, x, bias = _weight(33, 200, 5), torch.randn(4, 200, dtype=torch.float64), torch.randn(33)
    q = scheme.quantize(weight)
    got = scheme.reference_linear(x, scheme.pack(q).list(), bias, 33)
    torch.testing.assert_close(got, x @ scheme.dequantize(q).double().t() + bias.double(), rtol=1e-6, atol=1e-6)


def test_rotated_weight_only_approximates_the_float_matmul_and_helps_with_outliers():
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(64, 256, generator=generator)
    weight[:, ::37] *= 25  # outlier columns: one per group dominates its scale without the rotation
    x = torch.randn(16, 256, generator=generator)
    exact = x @ weight.t()
    errors = {}
    for name in ("mxfp4", "mxfp4-had", "mxfp4-had128"):
        scheme = parse_scheme(name)
        y = scheme.reference_linear(x, scheme.pack(scheme.quantize(weight)).list(), None, 64)
        errors[name] = ((y - exact).norm() / exact.norm()).item()
    assert errors["mxfp4-had"] < 0.2 and errors["mxfp4-had128"] < 0.2
    assert errors["mxfp4-had"] < 0.8 * errors["mxfp4"] and errors["mxfp4-had128"] < 0.8 * errors["mxfp4"], errors


@pytest.mark.parametrize("name", ["mxfp4-w4a4", "mxfp4-w4a4-had"])
@pytest.mark.parametrize("n, k", SHAPES)
def test_w4a4_reference_matches_the_definition(name, n, k):
    """Each token rotated, quantized per group of 32 by the same rule, times the quantized weight."""
    scheme = parse_scheme(name)
    weight, bias = _weight(n, k, seed=7), torch.randn(n)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    x[1] = 0.0  # an all-zero token
    packed = scheme.pack(scheme.quantize(weight))
    kp = scheme.padded_in_features(k)
    w = scheme.dequantize_rotated(scheme.unpack(packed, k)).numpy()
    expected = np.zeros((3, n))
    for i, row in enumerate(spec.padded_rotated(x.numpy(), kp, scheme.rotation)):
        row32 = [spec.f32(v) for v in row]
        xq = []
        for g in range(0, kp, 32):
            s, codes = spec.mx_block(row32[g : g + 32])
            xq += [spec.e2m1_value(c) * 2.0 ** (s - 127) for c in codes]
        expected[i] = np.array(xq) @ w.T + bias.double().numpy()
    got = scheme.reference_linear(x, packed.list(), bias, n)
    torch.testing.assert_close(got, torch.from_numpy(expected), rtol=1e-9, atol=1e-9)
    assert got.dtype == torch.float64


def test_w4a4_costs_some_accuracy_but_stays_close():
    generator = torch.Generator().manual_seed(9)
    weight, x = torch.randn(64, 256, generator=generator), torch.randn(8, 256, generator=generator)
    exact = x @ weight.t()
    error = {}
    for name in ("mxfp4-had", "mxfp4-w4a4-had"):
        scheme = parse_scheme(name)
        y = scheme.reference_linear(x, scheme.pack(scheme.quantize(weight)).list(), None, 64)
        error[name] = ((y - exact).norm() / exact.norm()).item()
    assert error["mxfp4-had"] < error["mxfp4-w4a4-had"] < 0.25, error


def test_unpack_inverts_pack_and_wrong_tensors_are_named():
    scheme = parse_scheme("mxfp4-had")
    q = scheme.quantize(_weight(5, 70, 10))
    packed = scheme.pack(q)
    back = scheme.unpack(packed, 70)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scales, q.scales) and back.global_scale is None
    with pytest.raises(ValueError, match=r"mxfp4-had: scales is float32\[5, 3\], expected uint8\[5, 3\]"):
        scheme.check_packed([packed.qweight, packed.scales.float()], 5, 70, where="layer.0")
