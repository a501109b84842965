"""SpQR kernels against the scheme's reference (``qcompile.schemes.spqr``, itself checked against ``spqr_quant``'s
decoding in ``tests/schemes/test_spqr.py``): the C++ CPU kernels (``codegen/cpp/kernels/spqr.h``) on every
instruction set this CPU runs, the Triton kernels under ``TRITON_INTERPRET=1`` on CPU tensors (on CUDA where the
interpreter is off), and the missing ONNX lowering's error.

Every case has a random input permutation, outliers, and ragged N and K (the format pads to 16; the kernels read the
padding words and never an activation past K). Tolerances, worst error / (|reference| + rms(reference)):
* float32: both decode the same float16 weights exactly; the sums differ in order (float32): measured below 1e-6. We
  allow 5e-6.
* bfloat16: both round one float result to bfloat16 (the reference's bfloat16 matmul also rounds the weight): a few
  bfloat16 steps (2**-8 each) at most. We allow 1.6e-2.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qcompile.codegen.cpp import library  # noqa: E402
from qcompile.codegen.cpp import spqr as cpp_spqr  # noqa: E402
from qcompile.runtime import dispatch, ops  # noqa: E402
from qcompile.schemes import parse_scheme  # noqa: E402

from cpp_required import skip_reason  # noqa: E402

SCHEME = parse_scheme("spqr-3")
# (M, K, N): K and N ragged against the 16 x 16 tiles; M = 20 takes the C++ dequantize + GEMM path
SHAPES = [(1, 70, 5), (3, 200, 33), (20, 130, 37)]
TOLERANCE = {torch.float32: 5e-6, torch.bfloat16: 1.6e-2}
cpp = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))
ISAS = library.available_isas() if skip_reason() is None else []


def _case(m, k, n, dtype=torch.float32, seed=0, bias=True, threshold=0.05):
    g = torch.Generator().manual_seed(seed)
    kp = SCHEME.padded_in_features(k)
    perm = torch.cat([torch.randperm(k, generator=g), torch.arange(k, kp)])
    q = SCHEME.quantize(torch.randn(n, k, generator=g)[:, perm[:k]], outlier_threshold=threshold)
    q.perm = perm
    assert threshold is None or q.nnz > 0
    x = torch.randn(m, k, generator=g).to(dtype)
    return SCHEME.pack(q).list(), x, torch.randn(n, generator=g) if bias else None


def _assert_matches_reference(y, x, packed, bias):
    n = packed[1].shape[0] - 1
    ref = ops.reference_linear(x.cpu(), [t.cpu() for t in packed], None if bias is None else bias.cpu(), "spqr-3",
                               x.shape[-1], n)  # fmt: skip
    assert y.dtype == ref.dtype == x.dtype and y.shape == ref.shape
    y, ref = y.cpu().float(), ref.float()
    rms = ref.pow(2).mean().sqrt().item()
    error = ((y - ref).abs() / (ref.abs() + rms)).max().item()
    assert error <= TOLERANCE[x.dtype], f"{x.dtype}: worst relative error {error:.3g}"


# -- C++ ------------------------------------------------------------------------------------------------------------
@cpp
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_kernel_matches_reference(dtype, isa, monkeypatch):
    monkeypatch.setenv(library.ISA_ENV, isa)
    for i, (m, k, n) in enumerate(SHAPES):
        packed, x, bias = _case(m, k, n, dtype, seed=i, bias=i % 2 == 0)
        _assert_matches_reference(cpp_spqr.bind(SCHEME, x, packed, bias, n)(x, packed, bias), x, packed, bias)


@cpp
@pytest.mark.parametrize("isa", ISAS)
def test_cpp_dequantized_rows_are_the_reference_weight(isa, monkeypatch):
    """``dequant_spqr`` rows n0..n1 (not tile-aligned) against the reference weight in permuted column order."""
    monkeypatch.setenv(library.ISA_ENV, isa)
    packed, _, _ = _case(1, 70, 37, seed=5)
    kp = 80
    perm = cpp_spqr.permutation(packed[3])
    w = torch.zeros(37, kp)
    w[:, :70] = SCHEME.dequantize_packed(packed, 37, 70)
    expected = w[:, perm]
    call = cpp_spqr.launch.template("dequant_spqr", 70, 37, 4, (kp, 5, 29))
    out = torch.empty(24, kp)
    for i, tensor in enumerate(packed):
        call.tensors[i] = tensor.data_ptr()
    call.y, call.threads = out.data_ptr(), 2
    assert library.kernel("dequant_spqr")(call) == 0
    real = perm < 70  # the padding features' columns hold the decoded padding codes, which no activation meets
    assert torch.equal(out[:, real], expected[5:29, real])


@cpp
@pytest.mark.parametrize("m", [1, 5])
def test_one_and_two_threads_agree_exactly(m):
    packed, x, bias = _case(m, 130, 45, seed=7)
    launch = cpp_spqr.bind(SCHEME, x, packed, bias, 45)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = launch(x, packed, bias)
        torch.set_num_threads(2)
        two = launch(x, packed, bias)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@cpp
def test_op_dispatches_to_the_cpp_row():
    packed, x, bias = _case(2, 64, 16, seed=3)
    assert dispatch.choose_kernel("spqr-3", x, packed, bias, 64, 16).name == "cpp-spqr"
    _assert_matches_reference(torch.ops.qcompile.linear(x, packed, bias, "spqr-3", 64, 16), x, packed, bias)


@cpp
def test_float16_activations_fall_back_with_a_reason():
    packed, x, _ = _case(1, 32, 16)
    assert "float32 or bfloat16" in cpp_spqr.supports(SCHEME, x.half(), packed)


@cpp
def test_kernel_table_holds_the_spqr_kernels_for_every_isa():
    for isa in ISAS:
        for name in ("linear_spqr", "dequant_spqr"):
            assert library.load().qc_find_kernel(name.encode(), isa.encode()), (name, isa)


# -- Triton ---------------------------------------------------------------------------------------------------------
def _triton():
    pytest.importorskip("triton")
    from qcompile.codegen.triton import common
    from qcompile.codegen.triton import spqr as triton_spqr

    if not common.interpreting() and not torch.cuda.is_available():
        pytest.skip("no CUDA device and TRITON_INTERPRET is not 1")
    if common.interpreting() and type(triton_spqr.spqr_dense_kernel).__name__ != "InterpretedFunction":
        pytest.skip("triton kernels were created before TRITON_INTERPRET=1 was set")
    return triton_spqr, ("cpu" if common.interpreting() else "cuda")


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_matches_reference(dtype):
    triton_spqr, device = _triton()
    for i, (m, k, n) in enumerate([(1, 40, 5), (3, 70, 19)]):
        packed, x, bias = _case(m, k, n, dtype, seed=10 + i, bias=i == 0, threshold=0.1)
        on = [t.to(device) for t in packed]
        y = triton_spqr.spqr_linear(x.to(device), on, None if bias is None else bias.to(device))
        _assert_matches_reference(y, x, packed, bias)


@pytest.mark.triton
def test_triton_row_takes_cuda_calls_only_and_refuses_others_by_reason():
    triton_spqr, _ = _triton()
    rows = triton_spqr.kernel_entries("spqr")
    assert [r.device_type for r in rows] == ["cuda"] and triton_spqr.kernel_entries("higgs") == []
    packed, x, _ = _case(1, 32, 16)
    assert "needs a CUDA tensor" in triton_spqr.supports(SCHEME, x, packed)


@pytest.mark.triton
def test_triton_launcher_refuses_wrong_packed_tensors_naming_them():
    triton_spqr, _ = _triton()
    packed, x, _ = _case(1, 32, 16)
    with pytest.raises(ValueError, match="in_perm"):
        triton_spqr.spqr_linear(x, [*packed[:3], packed[3][:-1]])
    with pytest.raises(ValueError, match="takes 4 packed tensors"):
        triton_spqr.spqr_linear(x, packed[:3])


# -- ONNX -----------------------------------------------------------------------------------------------------------
def test_onnx_export_is_a_clear_error_naming_the_layer():
    from qcompile.onnx.base import ExportOptions, OnnxExportError
    from qcompile.onnx.families import lower_site

    packed, _, _ = _case(1, 32, 16)
    with pytest.raises(OnnxExportError) as error:
        lower_site("model.layers.2.mlp.down_proj", SCHEME, packed, 32, ExportOptions())
    for word in ("model.layers.2.mlp.down_proj", "spqr-3"):
        assert word in str(error.value)
