"""``mxfp6`` and ``mxfp8`` (OCP MX 6- and 8-bit): element codecs, E8M0 scales, fp6 packing, quantization and the
reference matmul, against float64 math written from the format definitions (``definitions.py``: codes decoded bit
by bit) and against the peers compressed-tensors, torchao and torch's own float8 dtypes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import definitions as spec
from qcompile.schemes import SchemeError, parse_scheme
from qcompile.schemes.mx import ELEMENTS, decode, e8m0_encode, encode, pack_fp6, unpack_fp6

SHAPES = [(5, 70), (33, 200)]
WEIGHT_ONLY = ["mxfp6-e3m2", "mxfp6-e2m3", "mxfp8-e4m3", "mxfp8-e5m2"]
ACTIVATIONS = ["mxfp6-e3m2-w6a6", "mxfp6-e2m3-w6a6", "mxfp8-e4m3-w8a8", "mxfp8-e5m2-w8a8"]
#: the spec's numbers (OCP MX v1.0, table 1 / section 5.3): largest finite value, emax, finite non-negative codes
SPEC = {"e2m3": (7.5, 2, 32), "e3m2": (28.0, 4, 32), "e4m3": (448.0, 8, 127), "e5m2": (57344.0, 15, 124)}


def _weight(n, k, seed):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1


def nearest_codes(values: np.ndarray, element: str) -> np.ndarray:
    """Codes by brute force over the type's finite values: the nearest (|v| clamped to the largest), a tie to the
    even code; the sign bit from the value's sign bit."""
    table = spec.mx_element_table(element)
    bits = spec.MX_ELEMENTS[element][0]
    magnitude = np.minimum(np.abs(values), table[-1])[..., None]
    distance = np.abs(magnitude - table)
    best = distance.min(-1, keepdims=True)
    index = np.where(distance == best, np.arange(len(table)), 10**6)
    even = np.where(index % 2 == 0, index, 10**6).min(-1)
    index = np.where(even < 10**6, even, index.min(-1))
    return index | (np.signbit(values).astype(np.int64) << (bits - 1))


def definition_quantize(rows: np.ndarray, element: str) -> tuple[list, np.ndarray]:
    """float32 rows ``[R, Kp]`` → (E8M0 bytes ``[R, Kp/32]``, codes ``[R, Kp]``), one group at a time."""
    table = spec.mx_element_table(element)
    emax = math.frexp(table[-1])[1] - 1
    scales, codes = [], np.zeros(rows.shape, dtype=np.int64)
    for r, row in enumerate(rows):
        scales.append([])
        for g in range(0, rows.shape[1], 32):
            amax = float(np.abs(row[g : g + 32]).max())
            e = -127 if amax == 0 else max(-127, min(127, math.frexp(amax)[1] - 1 - emax))
            scales[-1].append(e + 127)
            codes[r, g : g + 32] = nearest_codes(row[g : g + 32] / 2.0**e, element)
    return scales, codes


# -- element codecs ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("element", ELEMENTS)
def test_every_code_decodes_to_its_bit_pattern(element):
    """All 64 / 256 codes: the codec's table against the float64 bit-by-bit decoder, NaN and infinity included."""
    fmt = ELEMENTS[element]
    codes = np.arange(1 << fmt.bits)
    expected = spec.mx_element_decode(codes, element)
    got = decode(torch.from_numpy(codes), fmt, torch.float64).numpy()
    np.testing.assert_array_equal(got, expected)  # NaN == NaN here
    largest, emax, finite = SPEC[element]
    assert (fmt.max_value, fmt.emax, len(fmt.finite)) == (largest, emax, finite)
    assert np.isfinite(expected).sum() == 2 * finite


def test_special_codes_are_the_specs():
    assert math.isnan(ELEMENTS["e4m3"].values[0x7F]) and math.isnan(ELEMENTS["e4m3"].values[0xFF])
    assert ELEMENTS["e4m3"].values[0x7E] == 448 and ELEMENTS["e4m3"].values[1] == 2.0**-9
    e5m2 = ELEMENTS["e5m2"].values
    assert e5m2[0x7C] == math.inf and e5m2[0xFC] == -math.inf and all(math.isnan(e5m2[c]) for c in (0x7D, 0x7E, 0x7F))
    assert e5m2[0x7B] == 57344 and e5m2[1] == 2.0**-16
    assert ELEMENTS["e2m3"].values[1] == 0.125 and ELEMENTS["e2m3"].values[31] == 7.5
    assert ELEMENTS["e3m2"].values[1] == 0.0625 and ELEMENTS["e3m2"].values[31] == 28
    assert all(math.isfinite(v) for name in ("e2m3", "e3m2") for v in ELEMENTS[name].values)


@pytest.mark.parametrize("element, dtype", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_fp8_tables_equal_torch_float8(element, dtype):
    every = torch.arange(256, dtype=torch.uint8)
    theirs = every.view(dtype).double().numpy()
    np.testing.assert_array_equal(decode(every, ELEMENTS[element], torch.float64).numpy(), theirs)


def test_fp6_tables_equal_the_peers():
    """compressed-tensors' E2M3 magnitudes (``kE2M3ToFloat``) and torchao's fp6 decoders, all 64 codes."""
    from compressed_tensors.compressors.mxfp6.helpers import kE2M3ToFloat
    from torchao.prototype.mx_formats.kernels import f6_e2m3_unpacked_to_f32, f6_e3m2_unpacked_to_f32

    assert kE2M3ToFloat.tolist() == list(ELEMENTS["e2m3"].finite)
    every = torch.arange(64, dtype=torch.uint8)
    for element, theirs in (("e2m3", f6_e2m3_unpacked_to_f32), ("e3m2", f6_e3m2_unpacked_to_f32)):
        assert torch.equal(theirs(every), decode(every, ELEMENTS[element])), element


@pytest.mark.parametrize("element", ELEMENTS)
def test_encode_every_value_midpoint_and_neighbour(element):
    """Each finite value encodes to its own code (both signs); each midpoint between neighbours to the even code;
    a float32 step either side of a midpoint to the nearer one."""
    fmt = ELEMENTS[element]
    finite = torch.tensor(fmt.finite, dtype=torch.float32)
    codes = torch.arange(len(finite), dtype=torch.uint8)
    sign = 1 << (fmt.bits - 1)
    assert torch.equal(encode(finite, fmt), codes)
    assert torch.equal(encode(-finite, fmt), codes | sign)
    mids = (finite[1:] + finite[:-1]) / 2
    low = torch.arange(len(mids))
    assert torch.equal(encode(mids, fmt), (low + low % 2).to(torch.uint8))  # a tie goes to the even code
    assert torch.equal(encode(torch.nextafter(mids, torch.zeros(1)), fmt), low.to(torch.uint8))
    assert torch.equal(encode(torch.nextafter(mids, torch.full((1,), 1e9)), fmt), (low + 1).to(torch.uint8))
    assert torch.equal(encode(-mids, fmt), (low + low % 2).to(torch.uint8) | sign)


@pytest.mark.parametrize("element", ELEMENTS)
def test_encode_saturates_and_never_writes_nan_or_infinity(element):
    fmt = ELEMENTS[element]
    top, sign = len(fmt.finite) - 1, 1 << (fmt.bits - 1)
    big = torch.tensor([fmt.max_value * 1.01, fmt.max_value * 1.5, 1e30, math.inf, 3e38], dtype=torch.float32)
    assert encode(big, fmt).tolist() == [top] * 5
    assert encode(-big, fmt).tolist() == [top | sign] * 5
    assert encode(torch.tensor([0.0, -0.0, math.nan]), fmt).tolist() == [0, sign, 0]
    values = torch.randn(20000, generator=torch.Generator().manual_seed(0)) * fmt.max_value * 4
    decoded = decode(encode(values, fmt), fmt, torch.float64)
    assert torch.isfinite(decoded).all() and decoded.abs().max() == fmt.max_value


@pytest.mark.parametrize("element", ELEMENTS)
def test_encode_matches_the_definition_on_random_values(element):
    fmt = ELEMENTS[element]
    values = torch.randn(4000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    values = (values * torch.exp2(torch.randint(-12, 8, (4000,), generator=torch.Generator().manual_seed(2)))).float()
    values = values * fmt.max_value / 8
    assert encode(values, fmt).tolist() == nearest_codes(values.double().numpy(), element).tolist()


@pytest.mark.parametrize("element, dtype", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_fp8_encode_equals_torch_conversion_within_range(element, dtype):
    """torch's float32 → float8 cast rounds to nearest even too; in range the codes are the same."""
    fmt = ELEMENTS[element]
    values = torch.randn(20000, generator=torch.Generator().manual_seed(3)) * fmt.max_value / 4
    values = values.clamp(-fmt.max_value, fmt.max_value)
    assert torch.equal(encode(values, fmt), values.to(dtype).view(torch.uint8))


# -- E8M0 scales ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("element", ELEMENTS)
def test_scale_rule(element):
    """e = floor(log2(amax)) - emax (OCP MX v1.0 section 6.3), clamped to [-127, 127]; amax = 0 gives -127."""
    emax = SPEC[element][1]
    amax = torch.tensor([0.0, 1.0, 1.999, 2.0, 0.75, 2.0**-140, 3.0e38, 1e-45, 448.0, 7.5])
    expected = [0, 127 - emax, 127 - emax, 128 - emax, 126 - emax, 0, 127 + 127 - emax, 0, 127 + 8 - emax,
                127 + 2 - emax]  # fmt: skip
    assert e8m0_encode(amax, emax).tolist() == expected
    assert (e8m0_encode(torch.rand(1000) * 1e30, emax) != 255).all()


@pytest.mark.parametrize("name", WEIGHT_ONLY)
def test_all_zero_group_and_largest_element_saturation(name):
    """A zero group: scale byte 0, every code 0. amax = 1.9 * 2**emax: scale 2**0, and that element saturates at
    the type's largest value (the spec's floor rule keeps elements up to 2**(emax+1) on the grid's range)."""
    scheme = parse_scheme(name)
    fmt = scheme.fmt
    weight = torch.zeros(2, 64)
    weight[1, 32] = 1.9 * 2.0**fmt.emax
    weight[1, 33] = 1.0
    q = scheme.quantize(weight)
    assert q.scales.tolist() == [[0, 0], [0, 127]]
    assert not q.codes[0].any() and not q.codes[1, :32].any()
    assert decode(q.codes[1, 32:34], fmt).tolist() == [fmt.max_value, 1.0]


# -- fp6 packing ---------------------------------------------------------------------------------------------------
def test_fp6_bit_order():
    codes = torch.tensor([[1, 2, 3, 63, 0, 32, 0, 1]], dtype=torch.uint8)
    packed = pack_fp6(codes)
    # word 0 = 1 | 2 << 6 | 3 << 12 | 63 << 18 = 0xFC3081; word 1 = 32 << 6 | 1 << 18 = 0x040800
    assert packed.tolist() == [[0x81, 0x30, 0xFC, 0x00, 0x08, 0x04]]
    assert torch.equal(unpack_fp6(packed, 8), codes)
    with pytest.raises(ValueError, match="whole groups of 4"):
        pack_fp6(codes[:, :6])
    with pytest.raises(ValueError, match="uint8 of 6 bytes for Kp=8"):
        unpack_fp6(packed[:, :5], 8)


@pytest.mark.parametrize("element", ["e2m3", "e3m2"])
def test_fp6_packing_matches_compressed_tensors(element):
    """compressed-tensors packs E2M3 values 4 in 3 bytes; packing ignores what the codes mean, so the E3M2 codes
    go through it as the E2M3 values with the same codes. Its unpack reads our bytes back."""
    from compressed_tensors.compressors.mxfp6.helpers import pack_fp6_to_uint8, unpack_fp6_from_uint8

    codes = torch.randint(0, 64, (9, 96), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    as_e2m3 = decode(codes, ELEMENTS["e2m3"])
    ours = pack_fp6(codes)
    assert torch.equal(ours, pack_fp6_to_uint8(as_e2m3))
    assert torch.equal(unpack_fp6_from_uint8(ours, 9, 96, dtype=torch.float32), as_e2m3)
    assert torch.equal(unpack_fp6(ours, 96), codes)


# -- names and tensors -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", WEIGHT_ONLY + ACTIVATIONS)
def test_names_round_trip(name):
    scheme = parse_scheme(name)
    assert scheme.name == name and parse_scheme(scheme.name) == scheme
    assert scheme.element == name.split("-")[1] and scheme.quantizes_activations == (name in ACTIVATIONS)
    assert scheme.padded_in_features(70) == 96 and scheme.group_size_for(70) == 32


@pytest.mark.parametrize("name, words", [
    ("mxfp6", ["mxfp6-e3m2[-w6a6] or mxfp6-e2m3[-w6a6]"]), ("mxfp8", ["mxfp8-e4m3[-w8a8] or mxfp8-e5m2[-w8a8]"]),
    ("mxfp6-e4m3", ["malformed"]), ("mxfp8-e2m3", ["malformed"]), ("mxfp8-e4m3-w6a6", ["malformed"]),
    ("mxfp6-w6a6-e3m2", ["element type, then"]), ("mxfp8-e4m3-w4a4", ["malformed"]),
])  # fmt: skip
def test_bad_names_say_what_is_wrong(name, words):
    with pytest.raises(SchemeError) as error:
        parse_scheme(name)
    for word in (name, *words):
        assert word in str(error.value)


def test_bits_per_weight_and_tensors():
    assert parse_scheme("mxfp6-e3m2").bits_per_weight(64, 256) == 6.25
    assert parse_scheme("mxfp8-e5m2-w8a8").bits_per_weight(64, 256) == 8.25
    specs = {name: [(s.name, s.shape, s.dtype) for s in parse_scheme(name).tensors(5, 70)] for name in WEIGHT_ONLY}
    assert specs["mxfp6-e2m3"] == [("qweight", (5, 72), torch.uint8), ("scales", (5, 3), torch.uint8)]
    assert specs["mxfp8-e4m3"] == [("qweight", (5, 96), torch.float8_e4m3fn), ("scales", (5, 3), torch.uint8)]
    assert specs["mxfp8-e5m2"] == [("qweight", (5, 96), torch.float8_e5m2), ("scales", (5, 3), torch.uint8)]


# -- quantization against the definition ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", WEIGHT_ONLY)
@pytest.mark.parametrize("n, k", SHAPES)
def test_quantize_and_dequantize_match_the_definition(name, n, k):
    scheme = parse_scheme(name)
    weight = _weight(n, k, seed=n)
    weight[0, :32] = 0.0  # an all-zero group
    weight[1, 3] = 5.0  # an outlier: its group's other elements go to small codes and subnormals
    q = scheme.quantize(weight)
    kp = scheme.padded_in_features(k)
    rows = spec.f32(spec.pad(weight.double().numpy(), kp))
    scales, codes = definition_quantize(rows, scheme.element)
    assert q.scales.tolist() == scales
    assert q.codes.tolist() == codes.tolist()
    assert not q.codes[:, k:].any()
    packed = scheme.pack(q)
    expected = spec.mx_weight(scheme, packed.list(), n, k)[:, :k]  # the bytes decoded bit by bit
    np.testing.assert_array_equal(scheme.dequantize(q).double().numpy(), expected)
    back = scheme.unpack(packed, k)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scales, q.scales)


@pytest.mark.parametrize("name", WEIGHT_ONLY)
def test_codes_and_scales_equal_torchao_to_mx_floor(name):
    """torchao's ``to_mx`` with ``ScaleCalculationMode.FLOOR`` is the spec's rule: the same scales and codes."""
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2
    from torchao.prototype.mx_formats.mx_tensor import to_mx

    dtypes = {"e2m3": DTYPE_FP6_E2M3, "e3m2": DTYPE_FP6_E3M2, "e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
    scheme = parse_scheme(name)
    weight = _weight(33, 256, seed=5)
    weight[2, 40] = 30.0  # saturation and subnormals in one group
    scales, data = to_mx(weight, dtypes[scheme.element], 32, ScaleCalculationMode.FLOOR)
    q = scheme.quantize(weight)
    assert torch.equal(scales.view(torch.uint8), q.scales)
    assert torch.equal(data.view(torch.uint8), q.codes)


@pytest.mark.parametrize("name, threshold", [("mxfp8-e4m3", 1.75), ("mxfp6-e2m3", 1.9375)])
def test_compressed_tensors_rounds_its_scale_up_above_a_mantissa_threshold(name, threshold):
    """compressed-tensors' MX observer rounds amax to a power of two first (for MXFP8 with E2M1's mantissa width,
    for MXFP6 with E2M3's): where amax's mantissa is at least ``threshold`` its scale is one more than the spec's;
    elsewhere scales and every code agree (its MXFP8 weight is float8_e4m3fn, its MXFP6 one packs 4 in 3 bytes)."""
    from compressed_tensors.compressors.mxfp6.base import MXFP6PackedCompressor
    from compressed_tensors.compressors.mxfp8.base import MXFP8QuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    scheme = parse_scheme(name)
    weight = _weight(16, 256, seed=6)
    groups = weight.reshape(16, 8, 32)
    groups[::3, ::2, 0] = 1.96 * 2.0**-1  # some amax with a mantissa above either threshold
    args = QuantizationArgs(num_bits=scheme.bits, type="float", strategy="group", group_size=32,
                            scale_dtype=torch.uint8)  # fmt: skip
    scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    compressor = MXFP8QuantizationCompressor if scheme.bits == 8 else MXFP6PackedCompressor
    theirs = compressor.compress({"weight": weight, "weight_scale": scale},
                                 QuantizationScheme(targets=["Linear"], weights=args))  # fmt: skip
    packed = scheme.pack(scheme.quantize(weight))
    mantissa, _ = torch.frexp(groups.abs().amax(-1))  # in [0.5, 1): 2 * mantissa is amax's 1.m
    bump = (2 * mantissa >= threshold).to(torch.uint8)
    assert bump.any() and not bump.all()
    assert torch.equal(theirs["weight_scale"], packed.scales + bump)
    same = (bump == 0).repeat_interleave(32 * scheme.bits // 8, 1)
    key = "weight" if scheme.bits == 8 else "weight_packed"
    assert theirs[key].dtype == packed.qweight.dtype
    assert torch.equal(theirs[key].view(torch.uint8)[same], packed.qweight.view(torch.uint8)[same])


# -- the reference matmul ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", WEIGHT_ONLY)
def test_weight_only_reference_is_x_times_the_dequantized_weight(name):
    scheme = parse_scheme(name)
    weight, x, bias = _weight(33, 200, 7), torch.randn(4, 200, dtype=torch.float64), torch.randn(33)
    q = scheme.quantize(weight)
    got = scheme.reference_linear(x, scheme.pack(q).list(), bias, 33)
    torch.testing.assert_close(got, x @ scheme.dequantize(q).double().t() + bias.double(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("n, k", SHAPES)
def test_activation_quantization_matches_the_definition(name, n, k):
    """Each token zero-padded, quantized per group of 32 by the weight's rule (scales and codes by brute force here),
    times the quantized weight. Token 1 is zero, token 2 holds exact ties (odd multiples of half a spacing)."""
    scheme = parse_scheme(name)
    weight, bias = _weight(n, k, seed=8), torch.randn(n)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    x[1] = 0.0
    finite = torch.tensor(scheme.fmt.finite, dtype=torch.float64)
    x[2, :31] = ((finite[1:] + finite[:-1]) / 2)[-31:]  # the largest 31 midpoints: scale 2**0, each one a tie
    packed = scheme.pack(scheme.quantize(weight))
    kp = scheme.padded_in_features(k)
    rows = spec.f32(spec.pad(x.numpy(), kp))
    scales, codes = definition_quantize(rows, scheme.element)
    values = spec.mx_element_decode(codes, scheme.element) * np.repeat(np.exp2(np.array(scales) - 127.0), 32, axis=1)
    expected = values @ spec.mx_weight(scheme, packed.list(), n, k).T + bias.double().numpy()
    got = scheme.reference_linear(x, packed.list(), bias, n)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert got.dtype == torch.float64
    half = 1 << (scheme.fmt.bits - 1)
    assert scales[2][0] == 127 and (codes[2, :31] % half % 2 == 0).all()  # the ties went to even codes


def test_activations_cost_some_accuracy_but_stay_close():
    generator = torch.Generator().manual_seed(10)
    weight, x = torch.randn(64, 256, generator=generator), torch.randn(8, 256, generator=generator)
    exact = x @ weight.t()
    error = {}
    for name in WEIGHT_ONLY + ACTIVATIONS:
        scheme = parse_scheme(name)
        y = scheme.reference_linear(x, scheme.pack(scheme.quantize(weight)).list(), None, 64)
        error[name] = ((y - exact).norm() / exact.norm()).item()
    three, two = ("mxfp6-e2m3", "mxfp8-e4m3"), ("mxfp6-e3m2", "mxfp8-e5m2")  # mantissa bits of the element
    assert max(error[n] for n in three) < 0.7 * min(error[n] for n in two) and max(error.values()) < 0.1, error
    for name in WEIGHT_ONLY:
        activated = name + ("-w6a6" if name.startswith("mxfp6") else "-w8a8")
        assert error[name] < error[activated] < 2 * error[name] + 0.02, error


def test_wrong_tensors_are_named():
    scheme = parse_scheme("mxfp8-e5m2")
    packed = scheme.pack(scheme.quantize(_weight(5, 70, 11)))
    with pytest.raises(ValueError, match=r"mxfp8-e5m2: qweight is float8_e4m3fn\[5, 96\], expected float8_e5m2"):
        scheme.check_packed([packed.qweight.view(torch.float8_e4m3fn), packed.scales], 5, 70, where="layer.0")
    with pytest.raises(ValueError, match=r"layer.0: mxfp6-e3m2: scales is float32\[5, 3\], expected uint8\[5, 3\]"):
        six = parse_scheme("mxfp6-e3m2")
        p6 = six.pack(six.quantize(_weight(5, 70, 12)))
        six.check_packed([p6.qweight, p6.scales.float()], 5, 70, where="layer.0")
