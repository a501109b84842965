"""VPTQ kernels against the scheme's reference computed in float64: the C++ CPU kernels (``codegen/cpp/kernels/
vptq.h``) on every instruction set this CPU runs, and the Triton kernel under ``TRITON_INTERPRET=1`` on CPU tensors.
Packed weights are random indices over the whole range (main and residual, outliers), random float16 codebooks,
column scales (some negative) and biases and a random permutation; N is ragged against v (padding rows), K odd.

Tolerances, worst error / (|reference| + rms(reference)): float32 sums of float32 products: measured about 1e-6, we
allow 5e-6; bfloat16 (C++): the float32 result rounded once (2**-8): 4e-3; bfloat16 under the Triton interpreter
(its store truncates, 2**-7): 8e-3.
"""

from __future__ import annotations

import functools
import os
import pathlib
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qcompile.codegen.cpp import library  # noqa: E402
from qcompile.codegen.cpp import vptq as cpp_vptq  # noqa: E402
from qcompile.runtime import dispatch  # noqa: E402
from qcompile.schemes import parse_scheme  # noqa: E402
from qcompile.schemes.vptq import VptqWeight  # noqa: E402

from cpp_required import skip_reason  # noqa: E402

#: register kernels (v a multiple of 4 but 20, 28): v = 16 (one zmm / two ymm), 8, 4 (xmm), 12 (ymm + xmm), 24, 32;
#: entries of 4 .. 26 bits (8+4 = 12 bits straddle words; AVX-512 decodes entries of up to 17 bits 16 at a time, wider
#: ones 8 at a time; AVX2 gathers 32-bit windows up to 25 bits, one 64-bit window per entry past that); the per-row
#: loop: v = 20, odd / small v, and 16+16 bits filling a word
FORMS = ["vptq-v16-k64", "vptq-v8-k256-r16", "vptq-v4-k64-r16-o8", "vptq-v12-k4096-r4096", "vptq-v24-k16-o3",
         "vptq-v32-k65536-r1024", "vptq-v20-k32", "vptq-v3-k32-o5", "vptq-v1-k16-r4", "vptq-v2-k65536-r65536"]
# (M, K, N): N not a multiple of v, K odd; M below the GEMM path's threshold
SHAPES = [(1, 37, 21), (5, 70, 33)]
TOLERANCE = {torch.float32: 5e-6, torch.bfloat16: 4e-3}
cpp = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))
ISAS = library.available_isas() if skip_reason() is None else []


@functools.cache
def _packed(name, n, k, seed=0):
    s = parse_scheme(name)
    g = torch.Generator().manual_seed(seed)
    r, gs, o = s.vector_rows(n), k - s.outliers, s.outliers

    def book(size):
        return (torch.randn(size, s.vector_len, generator=g) * 0.5).half()

    scale = (torch.rand(k, generator=g) + 0.5) * torch.where(torch.rand(k, generator=g) < 0.2, -1.0, 1.0)
    q = VptqWeight(torch.randint(0, s.centroids, (r, gs), generator=g),
                   torch.randint(0, s.res_centroids, (r, gs), generator=g) if s.res_centroids else None,
                   torch.randint(0, s.centroids, (r, o), generator=g) if o else None, book(s.centroids),
                   book(s.res_centroids) if s.res_centroids else None, book(s.centroids) if o else None, scale.half(),
                   (torch.randn(k, generator=g) * 0.1).half(), torch.randperm(k, generator=g), n, k)  # fmt: skip
    return s.pack(q).list()


def _case(name, m, k, n, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(100 + m)
    x = torch.randn(m, k, generator=g).to(dtype)
    return parse_scheme(name), _packed(name, n, k), x, torch.randn(n, generator=g) if bias else None


def _assert_matches_reference(y, scheme, x, packed, bias, n, tol=None):
    w = scheme.dequantize_packed([t.cpu() for t in packed], n, x.shape[-1]).double()
    ref = x.cpu().double() @ w.t() + (0 if bias is None else bias.cpu().double())
    assert y.dtype == x.dtype and tuple(y.shape) == tuple(ref.shape)
    tol = tol or TOLERANCE[x.dtype]
    rms = ref.pow(2).mean().sqrt().item()
    error = ((y.cpu().double() - ref).abs() / (ref.abs() + rms)).max().item()
    assert error <= tol, f"{scheme.name} {x.dtype}: worst relative error {error:.3g} > {tol}"


def test_reference_is_the_float64_definition():
    """The scheme's reference weight against the float64 definition written from the package's source."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "schemes"))  # the float64 definitions
    import definitions
    import numpy as np

    for name in FORMS:
        s, packed = parse_scheme(name), _packed(name, 21, 37)
        np.testing.assert_allclose(s.dequantize_packed(packed, 21, 37).double().numpy(),
                                   definitions.vptq_weight(s, packed, 21, 37), rtol=1e-6, atol=1e-6)  # fmt: skip


@cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", FORMS)
def test_cpp_kernel_matches_reference(name, dtype, isa, monkeypatch):
    monkeypatch.setenv(library.ISA_ENV, isa)
    for m, k, n in SHAPES:
        scheme, packed, x, bias = _case(name, m, k, n, dtype, bias=m > 1)
        y = cpp_vptq.bind(scheme, x, packed, bias, n)(x, packed, bias)
        _assert_matches_reference(y, scheme, x, packed, bias, n)


@cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", FORMS)
def test_cpp_many_token_path_and_dequantized_rows(name, isa, monkeypatch):
    """20 tokens take dequant_vptq + GEMM (slices of 7 rows: slices cross vector rows)."""
    monkeypatch.setenv(library.ISA_ENV, isa)
    monkeypatch.setattr(cpp_vptq, "GEMM_SLICE_BYTES", 4 * 70 * 7)
    scheme, packed, x, bias = _case(name, 20, 70, 33)
    y = cpp_vptq.bind(scheme, x, packed, bias, 33)(x, packed, bias)
    _assert_matches_reference(y, scheme, x, packed, bias, 33)


#: (name, N, K): shapes where the register kernels sum each (main, residual) centroid pair once per call and read it by
#: the raw entry: 2**tb entries, at most R * (K - o) of them and at most 256 KiB (kernels/vptq.h: VPTQ_PAIR_BYTES)
PAIRED = [("vptq-v4-k64-r16-o8", 70, 130), ("vptq-v8-k16-r16", 70, 130), ("vptq-v16-k32-r8-o2", 45, 100)]


@cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("name, n, k", PAIRED)
def test_cpp_kernel_with_summed_residual_pairs_matches_reference(name, n, k, m, isa, monkeypatch):
    monkeypatch.setenv(library.ISA_ENV, isa)
    scheme = parse_scheme(name)
    entries = 2**scheme.total_bits
    assert entries <= scheme.vector_rows(n) * (k - scheme.outliers) and entries * scheme.vector_len * 4 <= 256 << 10
    for dtype in (torch.float32, torch.bfloat16):
        scheme, packed, x, bias = _case(name, m, k, n, dtype)
        y = cpp_vptq.bind(scheme, x, packed, bias, n)(x, packed, bias)
        _assert_matches_reference(y, scheme, x, packed, bias, n)


@cpp
@pytest.mark.parametrize("m", [1, 3])
def test_op_dispatches_to_the_cpp_row_and_threads_agree(m):
    """One token (blocks of 1-token accumulators) and three (groups of 4 with a zero token); one and two threads give
    the same bits, with separate residual centroids and with summed pairs."""
    for name, n, k in [("vptq-v8-k256-r16", 33, 70), ("vptq-v4-k64-r16-o8", 70, 130)]:
        scheme, packed, x, bias = _case(name, m, k, n)
        row = dispatch.choose_kernel(scheme.name, x, packed, bias, k, n)
        assert row is not None and row.name == "cpp-vptq"
        y = torch.ops.qcompile.linear(x, packed, bias, scheme.name, k, n)
        _assert_matches_reference(y, scheme, x, packed, bias, n)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = cpp_vptq.bind(scheme, x, packed, bias, n)(x, packed, bias)
            torch.set_num_threads(2)
            two = cpp_vptq.bind(scheme, x, packed, bias, n)(x, packed, bias)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one, two)
    assert "float32 or bfloat16" in cpp_vptq.supports(scheme, x.half(), packed)


@cpp
def test_kernel_table_holds_the_vptq_kernels_for_every_isa():
    names = library.kernel_names()
    for kernel in ("linear_vptq", "dequant_vptq"):
        assert names.count(kernel) == len(library.ISAS), kernel


# -- Triton ---------------------------------------------------------------------------------------------------------
def _triton():
    from qcompile.codegen.triton import common
    from qcompile.codegen.triton import vptq as triton_vptq

    if not common.interpreting() and not torch.cuda.is_available():
        pytest.skip("no CUDA device and TRITON_INTERPRET is not set")
    if common.interpreting() and type(triton_vptq.vptq_linear_kernel).__name__ != "InterpretedFunction":
        pytest.skip("triton kernels were created before TRITON_INTERPRET=1 was set")
    return triton_vptq, ("cpu" if common.interpreting() else "cuda")


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["vptq-v8-k256-r16", "vptq-v4-k64-r16-o8", "vptq-v3-k32-o5",
                                  "vptq-v2-k65536-r65536"])
def test_triton_kernel_matches_reference(name, dtype):
    triton_vptq, device = _triton()
    scheme, packed, x, bias = _case(name, 3, 37, 21, dtype)
    y = triton_vptq.vptq_linear(x.to(device), [t.to(device) for t in packed], bias.to(device), scheme, 21)
    tol = None if dtype == torch.float32 else (8e-3 if device == "cpu" else 2e-2)
    _assert_matches_reference(y, scheme, x, packed, bias, 21, tol)


@pytest.mark.triton
def test_triton_row_takes_cuda_calls_only():
    triton_vptq, _ = _triton()
    (entry,) = triton_vptq.kernel_entries("vptq")
    assert entry.device_type == "cuda" and entry.name == "triton-vptq"
    assert triton_vptq.kernel_entries("aqlm") == []
    scheme, packed, x, _ = _case("vptq-v8-k256", 2, 37, 21)
    assert "CUDA" in triton_vptq.supports(scheme, x, packed)
