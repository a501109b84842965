"""SpQR kernels against the scheme's reference (``qcompile.schemes.spqr``, itself checked against ``spqr_quant``'s
decoding in ``tests/schemes/test_spqr.py``): the C++ CPU kernels (``codegen/cpp/kernels/spqr.h``) on every
instruction set this CPU runs (AVX-512 both with AVX512-FP16 tables and with float32 ones), the Triton kernels under
``TRITON_INTERPRET=1`` on CPU tensors (on CUDA where the interpreter is off), and the missing ONNX lowering's error.
Decoded weights are compared bit for bit, also for float16 statistics of any magnitude.

Every case has a random input permutation, outliers, and ragged N and K (the format pads to 16; the kernels read the
padding words and never an activation past K). Tolerances, worst error / (|reference| + rms(reference)):
* float32: both decode the same float16 weights exactly; the sums differ in order (float32): measured below 1e-6. We
  allow 5e-6.
* bfloat16: both round one float result to bfloat16 (the reference's bfloat16 matmul also rounds the weight): a few
  bfloat16 steps (2**-8 each) at most. We allow 1.6e-2.
"""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qcompile.codegen.cpp import library  # noqa: E402
from qcompile.codegen.cpp import spqr as cpp_spqr  # noqa: E402
from qcompile.runtime import dispatch, ops  # noqa: E402
from qcompile.schemes import parse_scheme  # noqa: E402
from qcompile.schemes.spqr import SpqrWeight  # noqa: E402

from cpp_required import skip_reason  # noqa: E402

SCHEME = parse_scheme("spqr-3")
# (M, K, N): K and N ragged against the 16 x 16 tiles; K = 600 spans two chunks of 32 tiles (accumulators kept
# between them); M = 6: a group of 4 tokens and one of 2; M = 20 takes the C++ dequantize + GEMM path
SHAPES = [(1, 70, 5), (3, 200, 33), (6, 600, 21), (20, 130, 37)]
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
#: the variants of an ISA: AVX-512 builds its tables with AVX512-FP16 arithmetic where the CPU has it, or
#: with float32 and vcvtps2ph (the only route of AVX2); both must give the reference's weights bit for bit
VARIANTS = [(isa, fp16) for isa in ISAS for fp16 in ((True, False) if isa == "avx512" else (True,))]
CPU_FLAGS = pathlib.Path("/proc/cpuinfo").read_text() if pathlib.Path("/proc/cpuinfo").exists() else ""
FP16_CPU = skip_reason() is None and library.cpu_supports("avx512") and "avx512_fp16" in CPU_FLAGS


@cpp
@pytest.mark.parametrize("isa, fp16", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_kernel_matches_reference(dtype, isa, fp16, monkeypatch):
    monkeypatch.setenv(library.ISA_ENV, isa)
    monkeypatch.setattr(cpp_spqr, "FLOAT16_ARITHMETIC", fp16)
    for i, (m, k, n) in enumerate(SHAPES):
        packed, x, bias = _case(m, k, n, dtype, seed=i, bias=i % 2 == 0)
        _assert_matches_reference(cpp_spqr.bind(SCHEME, x, packed, bias, n)(x, packed, bias), x, packed, bias)


def _dequantized(packed, k, n, n0, n1, fp16):
    """``dequant_spqr`` rows n0..n1 as float32 [n1 - n0, Kp]."""
    kp = SCHEME.padded_in_features(k)
    call = cpp_spqr.launch.template("dequant_spqr", k, n, 4, (kp, n0, n1, int(fp16)))
    out = torch.empty(n1 - n0, kp)
    for i, tensor in enumerate(packed):
        call.tensors[i] = tensor.data_ptr()
    call.y, call.threads = out.data_ptr(), 2
    assert library.kernel("dequant_spqr")(call) == 0
    return out


def _reference_rows(packed, k, n):
    """The reference weight [N, Kp] in permuted column order, and which columns are real input features."""
    kp = SCHEME.padded_in_features(k)
    perm = cpp_spqr.permutation(packed[3])
    w = torch.zeros(n, kp)
    w[:, :k] = SCHEME.dequantize_packed(packed, n, k)
    return w[:, perm], perm < k  # the padding features' columns hold decoded padding codes, which no activation meets


@cpp
@pytest.mark.parametrize("isa, fp16", VARIANTS)
def test_cpp_dequantized_rows_are_the_reference_weight(isa, fp16, monkeypatch):
    """``dequant_spqr`` rows n0..n1 (not tile-aligned) against the reference weight in permuted column order."""
    monkeypatch.setenv(library.ISA_ENV, isa)
    packed, _, _ = _case(1, 70, 37, seed=5)
    expected, real = _reference_rows(packed, 70, 37)
    assert torch.equal(_dequantized(packed, 70, 37, 5, 29, fp16)[:, real], expected[5:29, real])


@cpp
@pytest.mark.parametrize("isa, fp16", VARIANTS)
def test_cpp_weights_are_exact_for_any_float16_statistics(isa, fp16, monkeypatch):
    """Second-order statistics from random finite float16 bit patterns (any exponent, both signs) and one tile made to
    overflow: every h() step of the kernels (float32 + vcvtps2ph, AVX512-FP16, or double) rounds exactly as the
    reference, subnormal weights, overflow to infinity and 0 * inf = NaN included."""
    monkeypatch.setenv(library.ISA_ENV, isa)
    g = torch.Generator().manual_seed(11)
    n, k = 40, 90
    kp = SCHEME.padded_in_features(k)
    bits = torch.randint(0, 1 << 16, (3 * 6 * 4,), generator=g, dtype=torch.int32)
    bits = torch.where((bits & 0x7C00) == 0x7C00, bits & ~0x4000, bits)  # no infinity or NaN in the statistics
    second = bits.to(torch.int16).view(torch.float16).reshape(3, 6, 4)
    # tile (0, 0): scale = h(65504 * (qs + 65504)) = inf and integer zeros (zs = 1, zz = 0): q = qz gives inf * 0
    second[0, 0] = torch.tensor([65504.0, 1.0, -65504.0, 0.0], dtype=torch.float16)
    codes = torch.randint(0, 8, (48, kp), generator=g, dtype=torch.uint8)
    scale_codes, zero_codes = (torch.randint(0, 8, (48, kp // 16), generator=g, dtype=torch.uint8) for _ in range(2))
    no_outliers = torch.zeros(n + 1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0).half()
    q = SpqrWeight(codes, scale_codes, zero_codes, second, *no_outliers, torch.randperm(kp, generator=g), k, n)
    packed = SCHEME.pack(q).list()
    expected, real = _reference_rows(packed, k, n)
    assert expected.isinf().any() and expected.isnan().any() and ((expected != 0) & (expected.abs() < 2**-14)).any()
    torch.testing.assert_close(_dequantized(packed, k, n, 0, n, fp16)[:, real], expected[:, real], rtol=0, atol=0,
                               equal_nan=True)  # fmt: skip


@cpp
@pytest.mark.skipif(not FP16_CPU, reason="the CPU lacks AVX512-FP16: AVX-512 has one route only")
@pytest.mark.parametrize("m", [1, 6])
def test_cpp_float16_arithmetic_gives_the_same_bits(m, monkeypatch):
    """AVX-512 with and without AVX512-FP16 tables: the same weights and the same sums, so the same outputs."""
    monkeypatch.setenv(library.ISA_ENV, "avx512")
    packed, x, bias = _case(m, 600, 45, seed=8)
    outputs = []
    for fp16 in (True, False):
        monkeypatch.setattr(cpp_spqr, "FLOAT16_ARITHMETIC", fp16)
        outputs.append(cpp_spqr.bind(SCHEME, x, packed, bias, 45)(x, packed, bias))
    assert torch.equal(*outputs)


@cpp
@pytest.mark.parametrize("m", [1, 5])
def test_one_and_two_threads_agree_exactly(m):
    packed, x, bias = _case(m, 600, 45, seed=7)
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
