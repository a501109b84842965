"""Reference quantize/dequantize against float64 math, packing round trips, names that round-trip."""

import zlib

import pytest
import torch

from qcompile.schemes import FP8, NF4, IntWeightOnly, SchemeError, W8A8Int, example_names, parse_scheme
from qcompile.schemes.nf4 import NF4_LEVELS
from qcompile.schemes.packing import pack_codes, unpack_codes

SHAPES = [(7, 64), (16, 96), (5, 100), (3, 17), (33, 250)]  # ragged K on purpose
INT_NAMES = ["int8", "int8-g32-asym", "int4", "int4-g32", "int4-g64", "int4-g128", "int4-g32-sym", "int3-g64",
             "int3", "int2-g32", "int2-g16-sym"]  # fmt: skip


@pytest.mark.parametrize("name", [*example_names(), "int8-g64-asym", "int3-g32-sym", "nf4-g128", "w8a8-int8", "fp8-row"])
def test_names_round_trip(name):
    scheme = parse_scheme(name)
    assert parse_scheme(scheme.name) == scheme


def test_name_aliases_and_defaults():
    assert parse_scheme("int4-g128") == IntWeightOnly(bits=4, group_size=128, symmetric=False)
    assert parse_scheme("int8") == IntWeightOnly(bits=8, group_size=None, symmetric=True)
    assert parse_scheme("w8a8-int8") == W8A8Int()
    assert parse_scheme("fp8-row") == FP8(activations=False)
    assert parse_scheme("nf4-g64") == NF4(group_size=64)


@pytest.mark.parametrize("bad", ["int5", "int4-g7", "int4-g12", "fp16", "int4-g128-foo", ""])
def test_bad_names(bad):
    with pytest.raises(SchemeError):
        parse_scheme(bad)


def test_did_you_mean():
    with pytest.raises(SchemeError, match="Did you mean 'int4-g128'"):
        parse_scheme("in4-g128")


def _float64_rtn(weight, bits, group, symmetric):
    """Independent float64 RTN: returns the dequantized weight, the per-element half-step bound and the unrounded
    code ``w / scale`` (plus the zero), whose distance to a rounding tie says where float32 may round otherwise."""
    n, k = weight.shape
    g = group or k
    kp = -(-k // g) * g
    w = torch.nn.functional.pad(weight.double(), (0, kp - k)).reshape(n, kp // g, g)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = w.abs().amax(-1, keepdim=True) / qmax
        scale[scale == 0] = 1
        unrounded = w / scale
        q = torch.clamp(torch.round(unrounded), -qmax, qmax)
        deq = q * scale
    else:
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = (hi - lo) / (2**bits - 1)
        scale[scale == 0] = 1
        zero = -lo / scale
        unrounded = w / scale + zero
        q = torch.clamp(torch.round(unrounded), 0, 2**bits - 1)
        deq = (q - zero) * scale
    half_step = (scale / 2).expand_as(w)
    return deq.reshape(n, kp)[:, :k], half_step.reshape(n, kp)[:, :k], unrounded.reshape(n, kp)[:, :k]


@pytest.mark.parametrize("name", INT_NAMES)
@pytest.mark.parametrize("shape", SHAPES)
def test_integer_rtn_matches_float64(name, shape):
    scheme = parse_scheme(name)
    torch.manual_seed(zlib.crc32(repr((name, shape)).encode()))  # the same weights in every run
    weight = torch.randn(shape) * torch.rand(shape[0], 1) * 3
    q = scheme.quantize(weight)
    deq = scheme.dequantize(q).double()
    expected, half_step, unrounded = _float64_rtn(weight, scheme.bits, scheme.group_size, scheme.symmetric)
    # every element within half a step of the original (the definition of round-to-nearest) ...
    assert ((deq - weight.double()).abs() <= half_step * (1 + 1e-5) + 1e-7).all()
    # ... and equal to the float64 computation except next to a rounding tie, where float32 may round the other way
    mismatch = (deq - expected).abs() > 1e-4 * half_step.max()
    near_tie = ((unrounded - unrounded.floor()) - 0.5).abs() < 1e-4
    assert not (mismatch & ~near_tie).any(), unrounded[mismatch & ~near_tie]


@pytest.mark.parametrize("name", INT_NAMES + ["nf4-g64", "nf4-g32", "w8a8", "fp8", "fp8-w8a8"])
@pytest.mark.parametrize("shape", SHAPES)
def test_pack_unpack_round_trip(name, shape):
    scheme = parse_scheme(name)
    weight = torch.randn(shape)
    q = scheme.quantize(weight)
    packed = scheme.pack(q)
    assert packed.nbytes == scheme.packed_nbytes(*shape)
    scheme.check_packed(packed, *shape)
    assert packed.names() == [spec.name for spec in scheme.tensors(*shape)]
    back = scheme.unpack(packed, shape[1])
    assert torch.equal(back.codes.view(torch.uint8), q.codes.view(torch.uint8))
    torch.testing.assert_close(scheme.dequantize(back), scheme.dequantize(q), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bit_packing_element_order(bits):
    codes = torch.randint(0, 2**bits, (3, 48), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, 48 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, 48), codes)
    # the documented order, checked bit by bit on row 0
    bitstream = [(int(packed[0, i // 8]) >> (i % 8)) & 1 for i in range(48 * bits)]
    per_unit = {2: 4, 3: 8, 4: 2}[bits]
    unit_bits = per_unit * bits
    for j in range(48):
        unit, slot = divmod(j, per_unit)
        value = sum(bitstream[unit * unit_bits + slot * bits + b] << b for b in range(bits))
        assert value == int(codes[0, j])


def test_padding_is_stated_and_sized():
    scheme = parse_scheme("int4-g128")
    assert scheme.padded_in_features(576) == 640
    assert scheme.packed_nbytes(10, 576) == 10 * (640 // 2) + 2 * 4 * 10 * 5


def test_fp8_matches_float64_rowwise():
    weight = torch.randn(9, 70, dtype=torch.float64)
    q = FP8().quantize(weight)
    scale = weight.abs().amax(1, keepdim=True) / 448
    expected = (weight / scale).float().to(torch.float8_e4m3fn).double() * scale
    torch.testing.assert_close(FP8().dequantize(q).double(), expected, rtol=1e-6, atol=1e-9)


def test_nf4_picks_nearest_level():
    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    q = NF4(32).quantize(weight)
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    groups = weight.double().reshape(64, 2, 32)
    normalized = groups / groups.abs().amax(-1, keepdim=True)
    distance = (normalized.unsqueeze(-1) - levels).abs()
    expected = distance.argmin(-1).reshape(64, 64)
    # the scheme divides in float32: only a value within float32 rounding of a midpoint may pick the other level
    two = distance.topk(2, largest=False).values
    near_tie = ((two[..., 1] - two[..., 0]) < 1e-6).reshape(64, 64)
    assert torch.equal(expected[~near_tie], q.codes.long()[~near_tie])
    assert near_tie.sum() <= 2
