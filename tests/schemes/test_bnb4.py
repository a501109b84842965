"""``bnb4`` (bitsandbytes' 4-bit state, blocks over the flattened weight) against bitsandbytes itself on CPU: its
tables and dynamic map, ``quantize_4bit`` byte for byte (codes, absmax, double-quantized absmax), ``dequantize_4bit``
value for value, for NF4 and FP4, with and without double quantization, float32 / bfloat16 / float16 weights (all
quantized in float32, as bitsandbytes does) and shapes whose blocks cross rows; names; the float64 definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import definitions
from qcompile.schemes import SchemeError, parse_scheme
from qcompile.schemes import bnb_blockwise as blockwise
from qcompile.schemes.bnb4 import Bnb4

# (N, K): blocks crossing rows (K % 64 != 0, odd N*K), whole rows of blocks, a tiny odd weight
SHAPES = [(33, 70), (64, 576), (7, 5)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bnb():
    import bitsandbytes.functional as functional

    return functional


def _weight(n, k, dtype=torch.float32, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[0, :3] = 0.0  # zeros (code of 0), a -0.0 and a whole zero block where the weight is large enough
    w[min(1, n - 1), 0] = -0.0
    if n * k >= 192:
        w.view(-1)[128:192] = 0.0
    return w.to(dtype)


def _theirs(w, quant_type, double_quant, blocksize=64):
    return _bnb().quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)


def _dequantize_theirs(packed, state, dtype):
    """bitsandbytes' ``dequantize_4bit`` with the output dtype set to ``dtype``."""
    functional = _bnb()
    copy = functional.QuantState(absmax=state.absmax, shape=state.shape, code=state.code, blocksize=state.blocksize,
                                 quant_type=state.quant_type, dtype=dtype, offset=state.offset, state2=state.state2)
    return functional.dequantize_4bit(packed, copy)


def test_names_round_trip_and_the_per_row_family_keeps_its_names():
    for name, fields in [("bnb-nf4", ("nf4", False, 64)), ("bnb-nf4-dq", ("nf4", True, 64)),
                         ("bnb-fp4", ("fp4", False, 64)), ("bnb-fp4-dq-b128", ("fp4", True, 128)),
                         ("bnb-nf4-b4096", ("nf4", False, 4096)), ("bnb-fp4-b32", ("fp4", False, 32))]:  # fmt: skip
        scheme = parse_scheme(name)
        assert (scheme.family, scheme.quant_type, scheme.double_quant, scheme.blocksize) == ("bnb4", *fields)
        assert scheme.name == name and parse_scheme(scheme.name) == scheme
    assert parse_scheme("bnb-nf4-dq-b64").name == "bnb-nf4-dq"
    assert parse_scheme("bnb-fp4-g64").family == "bnb-fp4" and parse_scheme("nf4-g64").family == "nf4"
    with pytest.raises(SchemeError, match=r"bnb-nf4-b100.*blocksize must be one of \(32, 64, 128"):
        parse_scheme("bnb-nf4-b100")
    with pytest.raises(ValueError, match="quant_type"):
        Bnb4(quant_type="int4")


def test_tables_and_dynamic_map_are_bitsandbytes_own():
    functional = _bnb()
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    assert torch.equal(blockwise.dynamic_map(), functional.create_dynamic_map(signed=True))
    for quant_type in ("nf4", "fp4"):
        assert torch.equal(blockwise.table(quant_type), functional.get_4bit_type(quant_type, device="cpu"))
        _, order = _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))
        assert torch.equal(torch.argsort(blockwise.table(quant_type), stable=True), order)
    # the float64 definition of the map (tests/schemes/definitions.py) agrees to a few float32 roundings
    np.testing.assert_allclose(blockwise.dynamic_map().double().numpy(), definitions.bnb_dynamic_map(), rtol=5e-7)


@pytest.mark.parametrize("seed", range(4))
def test_8bit_absmax_codes_equal_bitsandbytes_cpu_kernel(seed):
    """The dynamic-map quantizer against bitsandbytes' CPU ``quantize_blockwise`` (its 65536-bin table), including a
    zero block and values spanning six decades, where the table and an exact nearest search part ways."""
    functional = _bnb()
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(20000, generator=generator) ** 3 * 10 ** (seed - 2)
    values[256:512] = 0.0
    theirs, absmax = torch.ops.bitsandbytes.quantize_blockwise(values, functional.create_dynamic_map(), 256)
    ours, our_absmax = blockwise.quantize_dynamic_8bit(values, 256)
    assert torch.equal(ours, theirs) and torch.equal(our_absmax, absmax)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_and_dequantize_equal_bitsandbytes(quant_type, double_quant, n, k, dtype):
    w = _weight(n, k, dtype, seed=n + k)
    packed_theirs, state = _theirs(w, quant_type, double_quant)
    scheme = Bnb4(quant_type, double_quant)
    q = scheme.quantize(w)
    packed = scheme.pack(q)
    assert torch.equal(packed["qweight"], packed_theirs.reshape(-1))
    if double_quant:
        assert packed["absmax"].dtype == torch.uint8 and torch.equal(packed["absmax"], state.absmax)
        assert torch.equal(packed["nested_absmax"], state.state2.absmax)
        assert torch.equal(packed["nested_offset"], state.offset.reshape(1))
    else:
        assert packed["absmax"].dtype == torch.float32 and torch.equal(packed["absmax"], state.absmax)
    ours = scheme.dequantize_packed(packed, n, k)
    assert ours.dtype == torch.float32 and torch.equal(ours, _dequantize_theirs(packed_theirs, state, torch.float32))
    assert torch.equal(ours.to(dtype), _bnb().dequantize_4bit(packed_theirs, state))
    # unpack inverts pack (the padding nibble of an odd N*K included)
    assert torch.equal(scheme.pack(scheme.unpack(packed, k, n))["qweight"], packed["qweight"])


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_other_blocksizes_equal_bitsandbytes(blocksize):
    w = _weight(19, 100, seed=blocksize)
    packed_theirs, state = _theirs(w, "nf4", True, blocksize)
    scheme = parse_scheme(f"bnb-nf4-dq-b{blocksize}")
    packed = scheme.pack(scheme.quantize(w))
    assert torch.equal(packed["qweight"], packed_theirs.reshape(-1)) and torch.equal(packed["absmax"], state.absmax)
    ours = scheme.dequantize_packed(packed, 19, 100)
    assert torch.equal(ours, _dequantize_theirs(packed_theirs, state, torch.float32))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_blocks_crossing_rows_follow_the_flat_order(quant_type):
    """K = 48: bitsandbytes' AVX-512 CPU dequantizer indexes absmax per row there (a row of 48 is not whole blocks of
    64); its default backend, its quantizer and its CUDA kernels use the flattened order, as qcompile does."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    w = _weight(33, 48, seed=5)
    packed_theirs, state = _theirs(w, quant_type, False)
    scheme = Bnb4(quant_type)
    packed = scheme.pack(scheme.quantize(w))
    assert torch.equal(packed["qweight"], packed_theirs.reshape(-1)) and torch.equal(packed["absmax"], state.absmax)
    flat = _dequantize_4bit_compute(packed_theirs.reshape(-1), state.absmax, blockwise.table(quant_type), 64,
                                    (33, 48), torch.float32)  # fmt: skip
    assert torch.equal(scheme.dequantize_packed(packed, 33, 48), flat)


def test_bits_per_weight():
    assert Bnb4("nf4").bits_per_weight(4096, 4096) == 4.5
    assert abs(Bnb4("nf4", True).bits_per_weight(4096, 4096) - 4.127) < 1e-3


def test_reference_and_a_planted_code_flip_against_the_definition():
    """The reference matmul against the float64 definition, and a flipped code of weight row 1 (flattened element
    K, inside a block that crosses rows) moves output column 1 only."""
    n, k = 21, 45
    scheme = parse_scheme("bnb-fp4-dq")
    packed = scheme.pack(scheme.quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(2)))).list()
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(3))
    y = scheme.reference_linear(x, packed, None, n).double().numpy()
    expected, _ = definitions.linear(scheme, x, packed, None, n)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    perturbed = definitions.perturb(packed, row=1, k=k)
    moved = scheme.reference_linear(x, perturbed, None, n).double().numpy()
    np.testing.assert_allclose(moved, definitions.linear(scheme, x, perturbed, None, n)[0], rtol=0,
                               atol=1e-5 * np.abs(expected).max())  # fmt: skip
    changed = np.abs(moved - y).max(0) > 1e-6
    assert changed.tolist() == [i == 1 for i in range(n)]


def test_inconsistent_packed_bytes_are_refused_by_name():
    scheme = Bnb4("nf4")
    packed = scheme.pack(scheme.quantize(torch.randn(8, 64)))
    with pytest.raises(ValueError, match=r"bnb-nf4: qweight holds 256 bytes, not the codes of an \[N=8, K=60\]"):
        scheme.unpack(packed, 60, 8)
    short = [packed["qweight"], packed["absmax"][:-1]]
    with pytest.raises(ValueError, match=r"site: bnb-nf4: absmax is float32\[7\], expected float32\[8\]"):
        scheme.check_packed(short, 8, 64, where="site")
