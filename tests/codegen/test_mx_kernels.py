"""C++ CPU kernels of ``mxfp6`` and ``mxfp8`` (``codegen/cpp/kernels/mx.h``) against the schemes' float64 reference
and the bit-by-bit definition, on every instruction set this CPU runs.

Tolerances, worst error / (|reference| + rms(reference)) over the cases below:
* float32: the kernel sums float32 products (each exact: a float32 activation times an element of at most 4
  significant bits times a power of two) in float32, the reference in float64: a few 1e-7. We allow 5e-6.
* bfloat16: both round one result to bfloat16 (the kernel from float32, the reference from float64); they can differ
  by one bfloat16 step, 2**-8 of the value. We allow 4e-3.
* activations quantized: the kernel's quantized activation equals the reference's exactly (checked directly in
  ``test_prepared_activation_is_the_reference_quantization``), so the same tolerances apply.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest
import torch

from qcompile.codegen.cpp import launch, library, mx, op
from qcompile.runtime import dispatch, ops
from qcompile.schemes import PackedWeight, parse_scheme
from qcompile.schemes.mx import pack_fp6

from cpp_required import skip_reason

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "schemes"))
import definitions as spec  # noqa: E402  (the float64 definitions, tests/schemes/definitions.py)

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))

NAMES = ["mxfp6-e3m2", "mxfp6-e2m3", "mxfp8-e4m3", "mxfp8-e5m2", "mxfp6-e3m2-w6a6", "mxfp6-e2m3-w6a6",
         "mxfp8-e4m3-w8a8", "mxfp8-e5m2-w8a8"]  # fmt: skip
# (M, K, N): K and N ragged against the group of 32 and the kernels' 16-element blocks
SHAPES = [(1, 70, 5), (3, 200, 33), (6, 130, 37)]
TOLERANCE = {torch.float32: 5e-6, torch.bfloat16: 4e-3}
ISAS = library.available_isas()


def _case(name, m, k, n, dtype=torch.float32, seed=0, bias=True):
    generator = torch.Generator().manual_seed(seed)
    scheme = parse_scheme(name)
    weight = torch.randn(n, k, generator=generator)
    weight[0, :5] *= 40  # outliers: small codes and subnormal elements in their groups
    packed = scheme.pack(scheme.quantize(weight)).list()
    x = torch.randn(m, k, generator=generator).to(dtype)
    return scheme, packed, x, torch.randn(n, generator=generator) if bias else None


def _run(scheme, x, packed, bias):
    n = packed[0].shape[0]
    return mx.bind(scheme, x, packed, bias, n)(x, packed, bias)


def _assert_matches_reference(y, scheme, x, packed, bias):
    ref = ops.reference_linear(x, packed, bias, scheme.name, x.shape[-1], packed[0].shape[0])
    assert y.dtype == ref.dtype == x.dtype and y.shape == ref.shape
    tol = TOLERANCE[x.dtype]
    rms = ref.float().pow(2).mean().sqrt().item()
    error = ((y.float() - ref.float()).abs() / (ref.float().abs() + rms)).max().item()
    assert error <= tol, f"{scheme.name} {x.dtype}: worst relative error {error:.3g} > {tol}"


def _dequantized(scheme, packed, k, n0, n1):
    """dequant_mx: rows n0..n1 of the weight, float32 [n1 - n0, Kp]."""
    ints = mx.params(scheme, k)
    out = torch.empty(n1 - n0, ints[1])
    call = launch.template("dequant_mx", k, packed[0].shape[0], len(packed), ints)
    for i, tensor in enumerate(packed):
        call.tensors[i] = tensor.data_ptr()
    call.y, call.threads = out.data_ptr(), 1
    call.ints[3], call.ints[4] = n0, n1
    assert library.kernel("dequant_mx")(call) == 0
    return out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_kernel_matches_reference(name, dtype, isa, monkeypatch):
    monkeypatch.setenv(library.ISA_ENV, isa)
    for i, (m, k, n) in enumerate(SHAPES):
        scheme, packed, x, bias = _case(name, m, k, n, dtype, seed=i, bias=i % 2 == 0)
        _assert_matches_reference(_run(scheme, x, packed, bias), scheme, x, packed, bias)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("element", ["e3m2", "e2m3", "e4m3", "e5m2"])
def test_every_code_and_scale_decodes_exactly(element, isa, monkeypatch):
    """Every row holds every code (NaN and infinity included), in 12 rotations, under E8M0 bytes 100 .. 195: through
    ``dequant_mx`` each value, and with the special codes replaced by 0 through ``linear_mx`` with an identity
    activation (each value once more, now through the kernel's block decode); both against the bit-by-bit
    definition, exactly."""
    monkeypatch.setenv(library.ISA_ENV, isa)
    bits = spec.MX_ELEMENTS[element][0]
    scheme = parse_scheme(f"{'mxfp6' if bits == 6 else 'mxfp8'}-{element}")
    k = 128 if bits == 6 else 256
    codes = ((torch.arange(k)[None, :] + 7 * torch.arange(12)[:, None]) % (1 << bits)).to(torch.uint8)
    scales = torch.arange(100, 100 + 12 * k // 32, dtype=torch.uint8).reshape(12, k // 32)
    packed = [scheme.pack_codes(codes), scales]
    expected = spec.mx_weight(scheme, packed, 12, k)
    assert np.isfinite(expected).all() == (bits == 6)
    np.testing.assert_array_equal(_dequantized(scheme, packed, k, 0, 12).double().numpy(), expected)
    monkeypatch.setattr(mx, "GEMM_MIN_TOKENS", 1 << 20)  # every token through linear_mx
    special = torch.from_numpy(~np.isfinite(spec.mx_element_decode(codes.numpy(), element)))
    finite = [scheme.pack_codes(torch.where(special, 0, codes).to(torch.uint8)), scales]
    y = _run(scheme, torch.eye(k), finite, None)
    np.testing.assert_array_equal(y.t().double().numpy(), spec.mx_weight(scheme, finite, 12, k))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["mxfp6-e3m2-w6a6", "mxfp6-e2m3-w6a6", "mxfp8-e4m3-w8a8", "mxfp8-e5m2-w8a8",
                                  "mxfp8-e4m3"])  # fmt: skip
def test_prepared_activation_is_the_reference_quantization(name, dtype, isa, monkeypatch):
    """Padding and the activation codes: the kernel's values equal the reference's exactly (same float32 rule), on
    rows with a zero token, a huge one, a tiny one, exact ties and saturating values."""
    monkeypatch.setenv(library.ISA_ENV, isa)
    scheme = parse_scheme(name)
    x = torch.randn(9, 200, generator=torch.Generator().manual_seed(4))
    x[3] = 0.0
    x[5] *= 1e30
    x[6] *= 1e-35
    finite = torch.tensor(scheme.fmt.finite)
    x[7, :31] = ((finite[1:] + finite[:-1]) / 2)[-31:] * 2.0**-3  # exact ties at scale 2**-3
    x[8, :32] = torch.linspace(-1.99, 1.99, 32) * scheme.fmt.max_value  # amax 1.99 * max: saturation
    x = x.to(dtype)
    ints = mx.params(scheme, 200)
    xp = torch.empty(9, ints[1])
    call = launch.template("prepare_mx", 200, 1, 0, ints, (), dtype == torch.bfloat16)
    call.x, call.y, call.M, call.threads = x.data_ptr(), xp.data_ptr(), 9, 1
    assert library.kernel("prepare_mx")(call) == 0
    ref = torch.nn.functional.pad(x.double(), (0, ints[1] - 200))
    if scheme.activations:
        ref = scheme.quantize_activations(ref)
    assert torch.equal(xp.double(), ref)


@pytest.mark.parametrize("name", ["mxfp6-e3m2", "mxfp8-e5m2", "mxfp6-e2m3-w6a6"])
def test_dequantized_rows_are_the_reference_weight(name):
    scheme, packed, _, _ = _case(name, 1, 100, 29)
    q = scheme.unpack(PackedWeight.from_list(scheme, packed, 29, 100), 100)
    ref = scheme.dequantize_rows(q.codes, q.scales)[3:20]
    assert torch.equal(_dequantized(scheme, packed, 100, 3, 20).double(), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["mxfp6-e3m2", "mxfp6-e2m3-w6a6", "mxfp8-e4m3-w8a8", "mxfp8-e5m2"])
def test_many_token_path_matches_reference(name, dtype, monkeypatch):
    """Prepared activation times dequantized slices of rows, torch's GEMM (several slices, the last one short)."""
    monkeypatch.setattr(mx, "GEMM_MIN_TOKENS", 4)
    monkeypatch.setattr(mx, "GEMM_SLICE_BYTES", 4 * 224 * 7)
    scheme, packed, x, bias = _case(name, 6, 200, 45, dtype, seed=11)
    _assert_matches_reference(_run(scheme, x, packed, bias), scheme, x, packed, bias)


@pytest.mark.parametrize("name, row", [("mxfp6-e2m3-w6a6", "cpp-mxfp6"), ("mxfp8-e5m2", "cpp-mxfp8")])
def test_op_dispatches_to_the_cpp_row_and_the_cpp_op_serves_repeat_calls(name, row):
    scheme, packed, x, bias = _case(name, 3, 96, 48, seed=7)
    x = x.reshape(1, 3, 96)
    entry, reason = dispatch.select_kernel(scheme, x, packed)
    assert entry is not None and entry.name == row, reason
    first = torch.ops.qcompile.linear(x, packed, bias, name, 96, 48)
    before = op.stats()["fast"]
    second = torch.ops.qcompile.linear(x, packed, bias, name, 96, 48)
    if op.loaded():
        assert op.stats()["fast"] == before + 1  # activation quantization runs inside the kernel
    assert first.shape == (1, 3, 48) and torch.equal(first, second)
    _assert_matches_reference(second.reshape(3, 48), scheme, x.reshape(3, 96), packed, bias)


def test_float16_activations_fall_back_with_a_reason():
    scheme, packed, x, _ = _case("mxfp8-e4m3", 2, 64, 16)
    entry, reason = dispatch.select_kernel(scheme, x.half(), packed)
    assert entry is None and "cpp-mxfp8" in reason and "float16" in reason


@pytest.mark.parametrize("name, m", [("mxfp6-e3m2", 5), ("mxfp8-e4m3-w8a8", 3), ("mxfp8-e5m2", 20)])
def test_one_and_two_threads_agree_exactly(name, m):
    scheme, packed, x, bias = _case(name, m, 384, 301, seed=5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(scheme, x, packed, bias)
        torch.set_num_threads(2)
        two = _run(scheme, x, packed, bias)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_rows_of_both_families_and_the_kernel_table():
    assert [e.name for e in mx.kernel_entries("mxfp6")] == ["cpp-mxfp6"]
    assert [e.name for e in mx.kernel_entries("mxfp8")] == ["cpp-mxfp8"]
    assert mx.kernel_entries("mxfp4") == []
    names = library.kernel_names()
    for kernel in ("linear_mx", "prepare_mx", "dequant_mx"):
        assert names.count(kernel) == len(library.ISAS), kernel


def test_fp6_block_decode_reads_every_bit_position(monkeypatch):
    """64 rows, codes[r, j] = (r + j) % 64: each of the 16 element slots of a 12-byte block meets every code across
    the rows, so a wrong byte or shift in the SIMD unpacking shows (every ISA, identity activation, ``linear_mx``)."""
    monkeypatch.setattr(mx, "GEMM_MIN_TOKENS", 1 << 20)
    scheme = parse_scheme("mxfp6-e3m2")
    codes = ((torch.arange(64)[:, None] + torch.arange(128)[None, :]) % 64).to(torch.uint8)
    packed = [pack_fp6(codes), torch.full((64, 4), 127, dtype=torch.uint8)]
    expected = spec.mx_weight(scheme, packed, 64, 128)
    for isa in ISAS:
        monkeypatch.setenv(library.ISA_ENV, isa)
        y = _run(scheme, torch.eye(128), packed, None)
        np.testing.assert_array_equal(y.t().double().numpy(), expected, err_msg=isa)
