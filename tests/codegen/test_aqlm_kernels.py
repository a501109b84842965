"""AQLM kernels against the scheme's reference computed in float64: the C++ CPU kernels (``codegen/cpp/kernels/
aqlm.h``) on every instruction set this CPU runs, and the Triton kernel under ``TRITON_INTERPRET=1`` on CPU tensors
(on CUDA where the interpreter is off). Packed weights are random codes over the whole code range (negative stored
values included), random float16 codebooks and scales (one negative), so every entry and sign path is met.

Tolerances, worst error / (|reference| + rms(reference)):
* float32: the kernels sum look-up values or decoded entries in float32 (the reference in float64): measured below
  1e-6. We allow 5e-6.
* bfloat16 (C++): the float32 result rounded once to bfloat16 (2**-8 of the value at most). We allow 4e-3.
* bfloat16 under the Triton interpreter (fp32 dots): its float32 → bfloat16 store truncates (up to 2**-7). We allow
  8e-3; with bf16 tensor-core dots (CUDA) the weight is rounded too: 2e-2.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qcompile.codegen.cpp import aqlm as cpp_aqlm  # noqa: E402
from qcompile.codegen.cpp import launch, library, op  # noqa: E402
from qcompile.runtime import dispatch  # noqa: E402
from qcompile.schemes import parse_scheme  # noqa: E402
from qcompile.schemes.aqlm import wrap_codes  # noqa: E402

from cpp_required import skip_reason  # noqa: E402

#: look-up-table path (B <= 8: 1, 2 and 3 codebooks, groups of 8, 4, 2) and entry path (B > 8: 1x16, 2x12-g5)
FORMS = ["aqlm-2x8", "aqlm-1x8-g4", "aqlm-3x4-g2", "aqlm-1x16", "aqlm-2x12-g5"]
# (M, K, N): K ragged against the group (padded) and not, N odd; M below the GEMM path's threshold
SHAPES = [(1, 40, 5), (3, 70, 33), (9, 130, 37)]
TOLERANCE = {torch.float32: 5e-6, torch.bfloat16: 4e-3}
cpp = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))
ISAS = library.available_isas() if skip_reason() is None else []


@functools.cache
def _packed(name, n, k, seed):
    scheme = parse_scheme(name)
    g = torch.Generator().manual_seed(seed)
    groups = scheme.padded_in_features(k) // scheme.group_size
    codes = torch.randint(0, scheme.entries, (n, groups, scheme.num_codebooks), generator=g)
    books = (torch.randn(scheme.num_codebooks, scheme.entries, 1, scheme.group_size, generator=g) * 0.3).half()
    scales = (torch.rand(n, 1, 1, 1, generator=g) + 0.5).half()
    scales[n // 2] = -scales[n // 2]
    packed = [wrap_codes(codes, scheme.bits), books, scales]
    scheme.check_packed(packed, n, k)
    return packed


def _case(name, m, k, n, dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(m, k, generator=g).to(dtype)
    return parse_scheme(name), _packed(name, n, k, seed), x, torch.randn(n, generator=g) if bias else None


def _run_cpp(scheme, x, packed, bias):
    return cpp_aqlm.bind(scheme, x, packed, bias, packed[0].shape[0])(x, packed, bias)


def _assert_matches_reference(y, scheme, x, packed, bias, tol=None):
    n = packed[0].shape[0]
    w = scheme.dequantize_packed([t.cpu() for t in packed], n, x.shape[-1]).double()
    ref = x.cpu().double() @ w.t() + (0 if bias is None else bias.cpu().double())
    assert y.dtype == x.dtype and tuple(y.shape) == tuple(ref.shape)
    tol = tol or TOLERANCE[x.dtype]
    y = y.cpu().double()
    rms = ref.pow(2).mean().sqrt().item()
    error = ((y - ref).abs() / (ref.abs() + rms)).max().item()
    assert error <= tol, f"{scheme.name} {x.dtype}: worst relative error {error:.3g} > {tol}"


# -- C++ ------------------------------------------------------------------------------------------------------------
@cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", FORMS)
def test_cpp_kernel_matches_reference(name, dtype, isa, monkeypatch):
    monkeypatch.setenv(library.ISA_ENV, isa)
    for i, (m, k, n) in enumerate(SHAPES):
        scheme, packed, x, bias = _case(name, m, k, n, dtype, seed=i, bias=i % 2 == 0)
        _assert_matches_reference(_run_cpp(scheme, x, packed, bias), scheme, x, packed, bias)


@cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", FORMS)
def test_cpp_dequantized_rows_are_the_reference_weight(name, isa, monkeypatch):
    """Rows ``n0..n1`` of ``W`` (padding columns included): the same float32 sums as the reference, bit for bit."""
    monkeypatch.setenv(library.ISA_ENV, isa)
    scheme, packed, _, _ = _case(name, 1, 70, 29)
    ints = cpp_aqlm.params(scheme, 70)
    n0, n1 = 3, 20
    out = torch.empty(n1 - n0, ints[0])
    call = launch.template("dequant_aqlm", 70, 29, len(packed), ints)
    for i, tensor in enumerate(packed):
        call.tensors[i] = tensor.data_ptr()
    call.y, call.threads = out.data_ptr(), 1
    call.ints[4], call.ints[5] = n0, n1
    assert library.kernel("dequant_aqlm")(call) == 0
    ref = scheme.dequantize_packed(packed, 29, ints[0])[n0:n1]
    assert torch.equal(out, ref)


@cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["aqlm-2x8", "aqlm-1x16", "aqlm-3x4-g2"])
def test_cpp_many_token_path_matches_reference(name, dtype, monkeypatch):
    """Dequantized slices of rows and torch's GEMM (several slices, the last one short)."""
    monkeypatch.setattr(cpp_aqlm, "GEMM_SLICE_BYTES", 4 * 136 * 7)
    for m in (cpp_aqlm.GEMM_MIN_TOKENS, 40):
        scheme, packed, x, bias = _case(name, m, 130, 45, dtype, seed=m)
        _assert_matches_reference(_run_cpp(scheme, x, packed, bias), scheme, x, packed, bias)


@cpp
def test_op_dispatches_to_the_cpp_row_and_the_cpp_op_serves_repeat_calls():
    scheme, packed, x, bias = _case("aqlm-2x8", 3, 96, 48, seed=7)
    x = x.reshape(1, 3, 96)
    entry, reason = dispatch.select_kernel(scheme, x, packed)
    assert entry is not None and entry.name == "cpp-aqlm", reason
    first = torch.ops.qcompile.linear(x, packed, bias, scheme.name, 96, 48)
    before = op.stats()["fast"]
    second = torch.ops.qcompile.linear(x, packed, bias, scheme.name, 96, 48)
    if op.loaded():
        assert op.stats()["fast"] == before + 1
    assert first.shape == (1, 3, 48) and torch.equal(first, second)
    _assert_matches_reference(second.reshape(3, 48), scheme, x.reshape(3, 96), packed, bias)


@cpp
def test_float16_activations_fall_back_with_a_reason():
    scheme, packed, x, _ = _case("aqlm-2x8", 2, 64, 16)
    entry, reason = dispatch.select_kernel(scheme, x.half(), packed)
    assert entry is None and "cpp-aqlm" in reason and "float16" in reason


@cpp
@pytest.mark.parametrize("name, m", [("aqlm-2x8", 5), ("aqlm-1x16", 6)])
def test_one_and_two_threads_agree_exactly(name, m):
    scheme, packed, x, bias = _case(name, m, 520, 301, seed=5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_cpp(scheme, x, packed, bias)
        torch.set_num_threads(2)
        two = _run_cpp(scheme, x, packed, bias)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@cpp
def test_kernel_table_holds_the_aqlm_kernels_for_every_isa():
    names = library.kernel_names()
    for kernel in ("linear_aqlm", "dequant_aqlm"):
        assert names.count(kernel) == len(library.ISAS), kernel


# -- Triton ---------------------------------------------------------------------------------------------------------
def _triton():
    pytest.importorskip("triton")
    from qcompile.codegen.triton import aqlm as triton_aqlm
    from qcompile.codegen.triton import common

    if not common.interpreting() and not torch.cuda.is_available():
        pytest.skip("no CUDA device and TRITON_INTERPRET is not 1")
    if common.interpreting() and type(triton_aqlm.aqlm_linear_kernel).__name__ != "InterpretedFunction":
        pytest.skip("triton kernels were created before TRITON_INTERPRET=1 was set")
    return triton_aqlm, ("cpu" if common.interpreting() else "cuda")


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", FORMS)
def test_triton_kernel_matches_reference(name, dtype):
    """M = 3 (split-K path) and M = 20 (no split), K ragged against the group and the tile, N not a multiple of it."""
    triton_aqlm, device = _triton()
    for m, seed in ((3, 0), (20, 1)):
        scheme, packed, x, bias = _case(name, m, 70, 24, dtype, seed=seed, bias=seed == 0)
        y = triton_aqlm.aqlm_linear(x.to(device), [t.to(device) for t in packed],
                                    None if bias is None else bias.to(device), scheme)  # fmt: skip
        tol = TOLERANCE[dtype] if dtype == torch.float32 else (2e-2 if device == "cuda" else 8e-3)
        _assert_matches_reference(y, scheme, x, packed, bias, tol)


@pytest.mark.triton
def test_triton_row_takes_cuda_calls_only_and_refuses_others_by_reason():
    triton_aqlm, _ = _triton()
    (entry,) = triton_aqlm.kernel_entries("aqlm")
    assert entry.device_type == "cuda" and entry.families == ("aqlm",) and entry.name == "triton-aqlm"
    assert triton_aqlm.kernel_entries("higgs") == []
    scheme, packed, x, _ = _case("aqlm-2x8", 2, 64, 16)
    assert "needs a CUDA tensor" in entry.supports(scheme, x, packed)


@pytest.mark.triton
def test_triton_launcher_refuses_wrong_packed_tensors_naming_them():
    triton_aqlm, device = _triton()
    scheme, packed, x, _ = _case("aqlm-2x8", 2, 70, 16)
    wrong = r"aqlm_linear\(aqlm-2x8\).*scales is float32\[16, 1, 1, 1\], expected float16"
    with pytest.raises(ValueError, match=wrong):
        triton_aqlm.aqlm_linear(x.to(device), [packed[0].to(device), packed[1].to(device),
                                               packed[2].float().to(device)], None, scheme)  # fmt: skip
    with pytest.raises(ValueError, match=r"codes is int8\[16, 9, 2\], expected int8\[16, 8, 2\] for \[N=16, K=64\]"):
        triton_aqlm.aqlm_linear(x[:, :64].to(device), [t.to(device) for t in packed], None, "aqlm-2x8")
