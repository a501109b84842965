"""C++ CPU kernels of ``mxfp4`` and ``nvfp4`` (``codegen/cpp/kernels/fp4.h``) against the schemes' float64 reference,
on every instruction set this CPU runs.

Tolerances, worst error / (|reference| + rms(reference)) measured over the cases below:
* float32: <= 8e-7 (float32 sums in the kernel against float64 in the reference). We allow 5e-6.
* bfloat16: <= 1e-4: both round one float result to bfloat16 (the kernel from float32, the reference from
  float64); they can differ by one bfloat16 step, 2**-8 of the value. We allow 4e-3.
* w4a4: the activation codes are the reference's (same float32 scale arithmetic; checked directly in
  ``test_prepared_activation_is_the_reference_quantization``), so the same tolerances apply.
"""

from __future__ import annotations

import pytest
import torch

from qcompile.codegen.cpp import launch, library, mxfp4, op
from qcompile.runtime import dispatch, ops
from qcompile.schemes import PackedWeight, parse_scheme

from cpp_required import skip_reason

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))

MX = ["mxfp4", "mxfp4-had", "mxfp4-had128", "mxfp4-w4a4", "mxfp4-w4a4-had", "mxfp4-w4a4-had64"]
NV = ["nvfp4", "nvfp4-had", "nvfp4-had64", "nvfp4-w4a4", "nvfp4-w4a4-had", "nvfp4-w4a4-had128"]
# (M, K, N): K and N ragged against every group and rotation size
SHAPES = [(1, 70, 5), (3, 200, 33), (17, 130, 37)]
TOLERANCE = {torch.float32: 5e-6, torch.bfloat16: 4e-3}
ISAS = library.available_isas()


def _kind(scheme) -> int:
    return mxfp4.KIND_E8M0 if scheme.family == "mxfp4" else mxfp4.KIND_E4M3


def _case(name, m, k, n, dtype=torch.float32, seed=0, bias=True):
    generator = torch.Generator().manual_seed(seed)
    scheme = parse_scheme(name)
    packed = scheme.pack(scheme.quantize(torch.randn(n, k, generator=generator))).list()
    x = torch.randn(m, k, generator=generator).to(dtype)
    return scheme, packed, x, torch.randn(n, generator=generator) if bias else None


def _run(scheme, x, packed, bias):
    n = packed[0].shape[0]
    return mxfp4.binder(_kind(scheme))(scheme, x, packed, bias, n)(x, packed, bias)


def _assert_matches_reference(y, scheme, x, packed, bias):
    ref = ops.reference_linear(x, packed, bias, scheme.name, x.shape[-1], packed[0].shape[0])
    assert y.dtype == ref.dtype == x.dtype and y.shape == ref.shape
    tol = TOLERANCE[x.dtype]
    rms = ref.float().pow(2).mean().sqrt().item()
    error = ((y.float() - ref.float()).abs() / (ref.float().abs() + rms)).max().item()
    assert error <= tol, f"{scheme.name} {x.dtype}: worst relative error {error:.3g} > {tol}"


def _prepared(scheme, x):
    """The kernel's prepared activation, float32 [M, Kp] (prepare_fp4)."""
    ints = mxfp4.params(scheme, _kind(scheme), x.shape[-1])
    xp = torch.empty(x.shape[0], ints[1])
    call = launch.template("prepare_fp4", x.shape[-1], 1, 0, ints, (), x.dtype == torch.bfloat16)
    call.x, call.y, call.M, call.threads = x.data_ptr(), xp.data_ptr(), x.shape[0], 1
    assert library.kernel("prepare_fp4")(call) == 0
    return xp


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", MX + NV)
def test_kernel_matches_reference(name, dtype, isa, monkeypatch):
    monkeypatch.setenv(library.ISA_ENV, isa)
    for i, (m, k, n) in enumerate(SHAPES):
        scheme, packed, x, bias = _case(name, m, k, n, dtype, seed=i, bias=i % 2 == 0)
        _assert_matches_reference(_run(scheme, x, packed, bias), scheme, x, packed, bias)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["mxfp4-w4a4", "nvfp4-w4a4", "mxfp4-w4a4-had64", "nvfp4-w4a4-had", "mxfp4-had"])
def test_prepared_activation_is_the_reference_quantization(name, dtype, isa, monkeypatch):
    """Padding, rotation and the W4A4 codes. Without a rotation the kernel's values are the reference's up to the
    float32 product ``code * unit``; the rotation sums in float32 (the reference in float64), which moves values by
    a few float32 steps but, for these inputs, no code."""
    monkeypatch.setenv(library.ISA_ENV, isa)
    scheme = parse_scheme(name)
    x = torch.randn(9, 200, generator=torch.Generator().manual_seed(4)).to(dtype)
    x[3] = 0.0
    x[5] *= 1e4
    ref = scheme.rotated_input(x)
    if scheme.activations:
        ref = scheme.quantize_activations(ref)
    got = _prepared(scheme, x).double()
    if scheme.rotation:
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
    else:
        assert ((got - ref).abs() <= 2.0**-23 * ref.abs()).all()


@pytest.mark.parametrize("name", ["mxfp4-had", "nvfp4", "nvfp4-had32"])
def test_dequantized_rows_are_the_reference_weight(name):
    scheme, packed, _, _ = _case(name, 1, 100, 29)
    ints = mxfp4.params(scheme, _kind(scheme), 100)
    n0, n1 = 3, 20
    out = torch.empty(n1 - n0, ints[1])
    call = launch.template("dequant_fp4", 100, 29, len(packed), ints)
    for i, tensor in enumerate(packed):
        call.tensors[i] = tensor.data_ptr()
    call.y, call.threads = out.data_ptr(), 1
    call.ints[5], call.ints[6] = n0, n1
    assert library.kernel("dequant_fp4")(call) == 0
    ref = scheme.dequantize_rotated(scheme.unpack(PackedWeight.from_list(scheme, packed, 29, 100), 100))[n0:n1]
    assert ((out.double() - ref).abs() <= 2.0**-23 * ref.abs()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["mxfp4-had", "mxfp4-w4a4", "nvfp4", "nvfp4-w4a4-had"])
def test_many_token_path_matches_reference(name, dtype, monkeypatch):
    """Prepared activation times dequantized slices of rows, torch's GEMM (several slices, the last one short)."""
    monkeypatch.setattr(mxfp4, "GEMM_MIN_TOKENS", 4)
    monkeypatch.setattr(mxfp4, "GEMM_SLICE_BYTES", 4 * 224 * 7)
    scheme, packed, x, bias = _case(name, 6, 200, 45, dtype, seed=11)
    _assert_matches_reference(_run(scheme, x, packed, bias), scheme, x, packed, bias)


@pytest.mark.parametrize("name, row", [("mxfp4-w4a4-had", "cpp-mxfp4"), ("nvfp4-had64", "cpp-nvfp4")])
def test_op_dispatches_to_the_cpp_row_and_the_cpp_op_serves_repeat_calls(name, row):
    scheme, packed, x, bias = _case(name, 3, 96, 48, seed=7)
    x = x.reshape(1, 3, 96)
    entry, reason = dispatch.select_kernel(scheme, x, packed)
    assert entry is not None and entry.name == row, reason
    first = torch.ops.qcompile.linear(x, packed, bias, name, 96, 48)
    before = op.stats()["fast"]
    second = torch.ops.qcompile.linear(x, packed, bias, name, 96, 48)
    if op.loaded():
        assert op.stats()["fast"] == before + 1  # rotation and activation quantization run inside the kernel
    assert first.shape == (1, 3, 48) and torch.equal(first, second)
    _assert_matches_reference(second.reshape(3, 48), scheme, x.reshape(3, 96), packed, bias)


def test_float16_activations_fall_back_with_a_reason():
    scheme, packed, x, _ = _case("nvfp4-had", 2, 64, 16)
    entry, reason = dispatch.select_kernel(scheme, x.half(), packed)
    assert entry is None and "cpp-nvfp4" in reason and "float16" in reason


@pytest.mark.parametrize("name, m", [("mxfp4-had", 5), ("nvfp4-w4a4-had", 3), ("nvfp4", 20)])
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


def test_kernel_table_holds_the_fp4_kernels_for_every_isa():
    names = library.kernel_names()
    for kernel in ("linear_fp4", "prepare_fp4", "dequant_fp4"):
        assert names.count(kernel) == len(library.ISAS), kernel
