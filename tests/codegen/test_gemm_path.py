"""The GEMM path of the integer C++ rows (many tokens): weights dequantized in slices into the activation's dtype
and torch's GEMM; W8A8 through torch's int8 GEMM. Checked against the reference op on ragged shapes, for every ISA
the machine runs; the choice of path per token count is checked without timing."""

from __future__ import annotations

import pytest
import torch

from qcompile.codegen.cpp import gemm_path, integer, launch, library
from qcompile.runtime import ops
from qcompile.schemes import parse_scheme
from qcompile.schemes.w8a8 import quantize_per_token_int8

from cpp_required import skip_reason

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))
ISAS = library.available_isas() if skip_reason() is None else []
DEQUANTIZED = ["int4-g128", "int4-g24", "int4-g64-sym", "int4", "int8", "int8-asym", "int8-g64"]
TOLERANCE = {torch.float32: 5e-5, torch.bfloat16: 1.6e-2}


def _packed(name: str, n: int, k: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    scheme = parse_scheme(name)
    return scheme, scheme.pack(scheme.quantize(torch.randn(n, k, generator=generator))).list()


def _dequantize(scheme, packed, n: int, k: int, dtype, n0: int, n1: int) -> torch.Tensor:
    ints, floats = integer._weight_only_params(scheme, k)
    out = torch.full((n1 - n0, k), float("nan"), dtype=dtype)
    call = launch.template("dequant_wo", k, n, len(packed), (*ints, n0, n1), floats, dtype == torch.bfloat16)
    for i, tensor in enumerate(packed):
        call.tensors[i] = tensor.data_ptr()
    call.y, call.threads = out.data_ptr(), 2
    assert library.kernel("dequant_wo")(call) == 0
    return out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", DEQUANTIZED)
def test_dequantized_rows_are_the_reference_weight_bit_for_bit(name, dtype, isa, monkeypatch):
    """``dequant_wo`` writes the reference's ``dequantize(...).to(dtype)`` exactly (bfloat16: nearest even)."""
    monkeypatch.setenv(library.ISA_ENV, isa)
    for n, k in ((9, 200), (5, 129), (3, 1000)):  # K ragged against every group, odd K, long rows
        scheme, packed = _packed(name, n, k, seed=k)
        expected = scheme.dequantize_packed(packed, n, k).to(dtype)
        assert torch.equal(_dequantize(scheme, packed, n, k, dtype, 0, n), expected)
        assert torch.equal(_dequantize(scheme, packed, n, k, dtype, 2, n - 1), expected[2 : n - 1])


def _close(y, ref, dtype):
    assert y.dtype == ref.dtype and y.shape == ref.shape
    tol = TOLERANCE[dtype]
    rms = ref.float().pow(2).mean().sqrt().item()
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol * rms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["int4-g128", "int4-g24", "int8-asym", "w8a8", "w4a8-g32", "w4a8-g64-sym"])
def test_gemm_path_matches_the_reference(name, dtype, monkeypatch):
    monkeypatch.setenv(gemm_path.ENV, "1")
    monkeypatch.setattr(integer, "GEMM_SLICE_BYTES", 4 * 130 * 7)  # several slices, the last one short
    for m, k, n, with_bias in ((1, 130, 45, True), (19, 130, 45, False), (70, 257, 33, True)):
        scheme, packed = _packed(name, n, k, seed=m)
        generator = torch.Generator().manual_seed(m + 1)
        x = torch.randn(m, k, generator=generator).to(dtype)
        bias = torch.randn(n, generator=generator) if with_bias else None
        row = {"w8a8": integer.w8a8_bind, "w4a8": integer.w4a8_bind}.get(name.split("-")[0], integer.weight_only_bind)
        y = row(scheme, x, packed, bias, n)(x, packed, bias)
        ref = ops.reference_linear(x, packed, bias, name, k, n)
        if name == "w8a8":  # the same int32 sums and epilogue as the reference
            assert torch.equal(y, ref)
        else:
            _close(y, ref, dtype)


@pytest.mark.parametrize("name, kind", [("int4-g128", "weight-only"), ("w8a8", "w8a8"), ("w4a8-g128", "w4a8")])
def test_the_path_follows_the_token_count(name, kind, monkeypatch):
    """Below the crossover the C++ kernel runs, from it on the GEMM path (counted, not timed)."""
    monkeypatch.setattr(gemm_path, "CROSSOVER", {(kind, torch.float32, gemm_path.machine_class()): 8})
    owner, gemm = {"weight-only": (launch.Slices, "run"), "w8a8": (integer, "int8_gemm"),
                   "w4a8": (launch.Slices, "run")}[kind]  # fmt: skip
    calls = []
    original = getattr(owner, gemm)
    monkeypatch.setattr(owner, gemm, lambda *args: calls.append(1) or original(*args))
    bind = {"weight-only": integer.weight_only_bind, "w8a8": integer.w8a8_bind, "w4a8": integer.w4a8_bind}[kind]
    scheme, packed = _packed(name, 16, 128)
    for m, expected in ((1, 0), (7, 0), (8, 1), (40, 2)):
        x = torch.randn(m, 128)
        bind(scheme, x, packed, None, 16)(x, packed, None)
        assert len(calls) == expected, m


@pytest.mark.parametrize("name", ["int4-g128", "w8a8", "w4a8-g32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_path_thread_counts_agree_exactly(name, dtype, monkeypatch):
    monkeypatch.setenv(gemm_path.ENV, "1")
    scheme, packed = _packed(name, 301, 384, seed=5)
    x = torch.randn(67, 384).to(dtype)
    row = {"w8a8": integer.w8a8_bind, "w4a8": integer.w4a8_bind}.get(name.split("-")[0], integer.weight_only_bind)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(row(scheme, x, packed, None, 301)(x, packed, None))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(*results)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_tokens_is_the_reference_quantization(dtype, isa, monkeypatch):
    """``quantize_tokens`` (W4A8's GEMM prologue) writes ``code * token scale`` with the reference's codes and
    scales, rounded once into the activation's dtype; an all-zero row stays zero."""
    monkeypatch.setenv(library.ISA_ENV, isa)
    generator = torch.Generator().manual_seed(7)
    x = (torch.randn(37, 203, generator=generator) * torch.logspace(-3, 3, 37)[:, None]).to(dtype)
    x[5] = 0
    x[9, 17] = 1e4  # one outlier: the rest of its row rounds to few codes
    x_q, x_scale = quantize_per_token_int8(x)
    expected = (x_q.to(torch.float32) * x_scale).to(dtype)
    assert torch.equal(launch.run_prologue("quantize_tokens", x.contiguous()), expected)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_token_codes_are_the_reference_codes(dtype, isa, monkeypatch):
    """``quantize_tokens`` in its int8 mode (W8A8's GEMM path) gives the reference's codes and scales exactly."""
    monkeypatch.setenv(library.ISA_ENV, isa)
    generator = torch.Generator().manual_seed(8)
    x = (torch.randn(29, 301, generator=generator) * torch.logspace(-4, 4, 29)[:, None]).to(dtype)
    x[3] = 0
    codes, scales = launch.quantize_tokens_int8(x.contiguous())
    expected_codes, expected_scales = quantize_per_token_int8(x)
    assert torch.equal(codes, expected_codes) and torch.equal(scales, expected_scales)


def test_crossover_override_is_checked(monkeypatch):
    monkeypatch.setenv(gemm_path.ENV, "0")
    with pytest.raises(ValueError, match=gemm_path.ENV):
        gemm_path.min_tokens("weight-only", torch.float32)
    monkeypatch.setenv(gemm_path.ENV, "12")
    assert gemm_path.min_tokens("w8a8", torch.bfloat16) == 12
    with pytest.raises(ValueError, match="unknown kind"):
        gemm_path.min_tokens("w2a2", torch.float32)
