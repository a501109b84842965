"""HIGGS kernels against the scheme's float64 reference: the C++ CPU kernels (``codegen/cpp/kernels/higgs.h``) on
every instruction set this CPU runs, the Triton kernels under ``TRITON_INTERPRET=1`` on CPU tensors (on CUDA where
the interpreter is off), and the grids compiled into C++ against the stored ones.

Tolerances, worst error / (|reference| + rms(reference)):
* float32: the kernels rotate and sum in float32 (the reference in float64) and multiply grid value by scale in
  float32: measured below 1e-6. We allow 5e-6.
* bfloat16 (C++): both round one float result to bfloat16, one bfloat16 step apart at most (2**-8 of the value).
  We allow 4e-3.
* bfloat16 under the Triton interpreter (fp32 dots): its float32 → bfloat16 store truncates (measured: up to 2**-7
  of the value, against round-to-nearest's 2**-8). We allow 8e-3.
* bfloat16 with bf16 tensor-core dots (Triton on CUDA): the rotated activation and the weight are rounded to bf16
  too. We allow 2e-2.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qcompile.codegen.cpp import build, launch, library, op  # noqa: E402
from qcompile.codegen.cpp import higgs as cpp_higgs  # noqa: E402
from qcompile.runtime import dispatch, ops  # noqa: E402
from qcompile.schemes import PackedWeight, higgs_grids, parse_scheme  # noqa: E402
from qcompile.schemes.higgs import walsh_hadamard  # noqa: E402

from cpp_required import skip_reason  # noqa: E402

#: every code width: p = 2 with b = 2, 3, 4 (4-, 6-, 8-bit codes), p = 1 with b = 2, 3, 4
FORMS = ["higgs-4-h64", "higgs-3-h32", "higgs-2-h64", "higgs-2-p1-h32", "higgs-3-p1-h64", "higgs-4-p1"]
# (M, K, N): K ragged against every Hadamard block, N odd; M below the GEMM path's threshold
SHAPES = [(1, 70, 5), (3, 200, 33), (9, 130, 37)]
TOLERANCE = {torch.float32: 5e-6, torch.bfloat16: 4e-3}
cpp = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))
ISAS = library.available_isas() if skip_reason() is None else []


def _case(name, m, k, n, dtype=torch.float32, seed=0, bias=True):
    generator = torch.Generator().manual_seed(seed)
    scheme = parse_scheme(name)
    packed = scheme.pack(scheme.quantize(torch.randn(n, k, generator=generator))).list()
    x = torch.randn(m, k, generator=generator).to(dtype)
    return scheme, packed, x, torch.randn(n, generator=generator) if bias else None


def _run_cpp(scheme, x, packed, bias):
    return cpp_higgs.bind(scheme, x, packed, bias, packed[0].shape[0])(x, packed, bias)


def _assert_matches_reference(y, scheme, x, packed, bias, tol=None):
    ref = ops.reference_linear(x.cpu(), [t.cpu() for t in packed], None if bias is None else bias.cpu(), scheme.name,
                               x.shape[-1], packed[0].shape[0])  # fmt: skip
    assert y.dtype == ref.dtype == x.dtype and y.shape == ref.shape
    tol = tol or TOLERANCE[x.dtype]
    y, ref = y.cpu().float(), ref.float()
    rms = ref.pow(2).mean().sqrt().item()
    error = ((y - ref).abs() / (ref.abs() + rms)).max().item()
    assert error <= tol, f"{scheme.name} {x.dtype}: worst relative error {error:.3g} > {tol}"


# -- C++ ------------------------------------------------------------------------------------------------------------
@cpp
def test_compiled_grids_are_the_stored_grids():
    header = (build.KERNEL_DIR / "higgs.h").read_text()
    compiled = higgs_grids.parse_cpp_tables(header)
    for (p, b), (points, _) in higgs_grids.load().items():
        assert compiled[(p, b)] == [v for point in points for v in point], (p, b)


@cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", FORMS)
def test_cpp_kernel_matches_reference(name, dtype, isa, monkeypatch):
    monkeypatch.setenv(library.ISA_ENV, isa)
    for i, (m, k, n) in enumerate(SHAPES):
        scheme, packed, x, bias = _case(name, m, k, n, dtype, seed=i, bias=i % 2 == 0)
        _assert_matches_reference(_run_cpp(scheme, x, packed, bias), scheme, x, packed, bias)


def _prepared(scheme, x, threads=1):
    return cpp_higgs.prepare(x.contiguous(), cpp_higgs.params(scheme, x.shape[-1]), threads)


@cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", ["higgs-4-h32", "higgs-2-p1-h64", "higgs-3"])
def test_cpp_rotation_is_the_walsh_hadamard_transform(name, isa, monkeypatch):
    """Zero padding and the butterflies: float32 sums against the float64 transform, a few float32 steps apart."""
    monkeypatch.setenv(library.ISA_ENV, isa)
    scheme = parse_scheme(name)
    x = torch.randn(5, 100, generator=torch.Generator().manual_seed(4))
    x[2] = 0.0
    ref = scheme.rotated(x)
    got = _prepared(scheme, x).double()
    assert got.shape == ref.shape and (got[2] == 0).all()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6 * ref.abs().max().item())
    torch.testing.assert_close(got, walsh_hadamard(torch.nn.functional.pad(x.double(), (0, ref.shape[1] - 100)),
                                                   scheme.hadamard), rtol=0, atol=1e-6 * ref.abs().max().item())


@cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", FORMS)
def test_cpp_dequantized_rows_are_the_reference_weight(name, isa, monkeypatch):
    """Rows ``n0..n1`` of ``Wr``: the float32 product of grid value and scale, one rounding off the exact one."""
    monkeypatch.setenv(library.ISA_ENV, isa)
    scheme, packed, _, _ = _case(name, 1, 100, 29)
    ints = cpp_higgs.params(scheme, 100)
    n0, n1 = 3, 20
    out = torch.empty(n1 - n0, ints[0])
    call = launch.template("dequant_higgs", 100, 29, len(packed), ints)
    for i, tensor in enumerate(packed):
        call.tensors[i] = tensor.data_ptr()
    call.y, call.threads = out.data_ptr(), 1
    call.ints[5], call.ints[6] = n0, n1
    assert library.kernel("dequant_higgs")(call) == 0
    ref = scheme.dequantize_rotated(scheme.unpack(PackedWeight.from_list(scheme, packed, 29, 100), 100))[n0:n1]
    assert ((out.double() - ref).abs() <= 2.0**-24 * ref.abs()).all()


@cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["higgs-3", "higgs-4-h64", "higgs-2-p1-h32"])
def test_cpp_many_token_path_matches_reference(name, dtype, monkeypatch):
    """Rotated activation times dequantized slices of rows, torch's GEMM (several slices, the last one short)."""
    monkeypatch.setattr(cpp_higgs, "GEMM_SLICE_BYTES", 4 * 512 * 7)
    for m in (cpp_higgs.GEMM_MIN_TOKENS, 40):
        scheme, packed, x, bias = _case(name, m, 200, 45, dtype, seed=m)
        _assert_matches_reference(_run_cpp(scheme, x, packed, bias), scheme, x, packed, bias)


@cpp
def test_op_dispatches_to_the_cpp_row_and_the_cpp_op_serves_repeat_calls():
    scheme, packed, x, bias = _case("higgs-3-h64", 3, 96, 48, seed=7)
    x = x.reshape(1, 3, 96)
    entry, reason = dispatch.select_kernel(scheme, x, packed)
    assert entry is not None and entry.name == "cpp-higgs", reason
    first = torch.ops.qcompile.linear(x, packed, bias, scheme.name, 96, 48)
    before = op.stats()["fast"]
    second = torch.ops.qcompile.linear(x, packed, bias, scheme.name, 96, 48)
    if op.loaded():
        assert op.stats()["fast"] == before + 1  # the rotation runs inside the kernel: no Python on a repeat call
    assert first.shape == (1, 3, 48) and torch.equal(first, second)
    _assert_matches_reference(second.reshape(3, 48), scheme, x.reshape(3, 96), packed, bias)


@cpp
def test_float16_activations_fall_back_with_a_reason():
    scheme, packed, x, _ = _case("higgs-4", 2, 64, 16)
    entry, reason = dispatch.select_kernel(scheme, x.half(), packed)
    assert entry is None and "cpp-higgs" in reason and "float16" in reason


@cpp
@pytest.mark.parametrize("name, m", [("higgs-4", 5), ("higgs-3-p1-h64", 20)])
def test_one_and_two_threads_agree_exactly(name, m):
    scheme, packed, x, bias = _case(name, m, 700, 301, seed=5)
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
def test_kernel_table_holds_the_higgs_kernels_for_every_isa():
    names = library.kernel_names()
    for kernel in ("linear_higgs", "prepare_higgs", "dequant_higgs"):
        assert names.count(kernel) == len(library.ISAS), kernel


# -- Triton ---------------------------------------------------------------------------------------------------------
def _triton():
    pytest.importorskip("triton")
    from qcompile.codegen.triton import common
    from qcompile.codegen.triton import higgs as triton_higgs

    if not common.interpreting() and not torch.cuda.is_available():
        pytest.skip("no CUDA device and TRITON_INTERPRET is not 1")
    if common.interpreting() and type(triton_higgs.higgs_linear_kernel).__name__ != "InterpretedFunction":
        pytest.skip("triton kernels were created before TRITON_INTERPRET=1 was set")
    return triton_higgs, ("cpu" if common.interpreting() else "cuda")


@pytest.mark.triton
@pytest.mark.parametrize("h, k", [(32, 70), (64, 64), (512, 600)])
def test_triton_rotation_is_the_walsh_hadamard_transform(h, k):
    triton_higgs, device = _triton()
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(h))
    kp = -(-k // h) * h
    got = triton_higgs.rotate(x.to(device), kp, h, torch.float32).cpu().double()
    ref = walsh_hadamard(torch.nn.functional.pad(x.double(), (0, kp - k)), h)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6 * ref.abs().max().item())


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", FORMS)
def test_triton_kernel_matches_reference(name, dtype):
    """M = 3 (split-K path) and M = 20 (no split), K ragged against the block, N not a multiple of the tile."""
    triton_higgs, device = _triton()
    for m, seed in ((3, 0), (20, 1)):
        scheme, packed, x, bias = _case(name, m, 70, 24, dtype, seed=seed, bias=seed == 0)
        y = triton_higgs.higgs_linear(x.to(device), [t.to(device) for t in packed],
                                      None if bias is None else bias.to(device), scheme)  # fmt: skip
        tol = TOLERANCE[dtype] if dtype == torch.float32 else (2e-2 if device == "cuda" else 8e-3)
        _assert_matches_reference(y, scheme, x, packed, bias, tol)


@pytest.mark.triton
def test_triton_row_takes_cuda_calls_only_and_refuses_others_by_reason():
    triton_higgs, _ = _triton()
    (entry,) = triton_higgs.kernel_entries("higgs")
    assert entry.device_type == "cuda" and entry.families == ("higgs",) and entry.name == "triton-higgs"
    assert triton_higgs.kernel_entries("nf4") == []
    scheme, packed, x, _ = _case("higgs-4", 2, 64, 16)
    assert "needs a CUDA tensor" in entry.supports(scheme, x, packed)


@pytest.mark.triton
def test_triton_launcher_refuses_wrong_packed_tensors_naming_them():
    triton_higgs, device = _triton()
    scheme, packed, x, _ = _case("higgs-3-h64", 2, 70, 16)
    with pytest.raises(ValueError, match=r"higgs_linear\(higgs-3-h64\).*scales is float32\[16, 2\], expected float16"):
        triton_higgs.higgs_linear(x.to(device), [packed[0].to(device), packed[1].float().to(device)], None, scheme)
    with pytest.raises(ValueError, match="bias is \\[15\\], expected \\[16\\]"):
        triton_higgs.higgs_linear(x.to(device), [t.to(device) for t in packed], torch.zeros(15, device=device),
                                  scheme)  # fmt: skip
