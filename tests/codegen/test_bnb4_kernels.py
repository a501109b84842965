"""C++ CPU kernels of ``bnb4`` (``codegen/cpp/kernels/bnb4.h``) and the ``llm-int8`` row (``codegen/cpp/llm_int8.py``
on the W8A8 kernel) against the schemes' references, on every instruction set this CPU runs.

Tolerances, worst error / (|reference| + rms(reference)):
* float32: 5e-6. The kernel's weights are the reference's float32 values bit for bit (checked directly on the
  dequantized rows); only the order of the float32 sums differs (measured <= 1e-6).
* bfloat16: 1e-2. The reference rounds each weight to bfloat16 before its matmul (2**-9 of it; NF4 levels times
  an absmax are not bfloat16 numbers), the kernel keeps float32 weights, and both round their output (measured 4.7e-3).
  The kernel is also held to its own rule: the float64 product of the activation and the float32 weight, rounded
  once to bfloat16 (|y - exact| <= 2**-8 |exact| + 1e-5 rms).
* llm-int8 float32: 5e-6. Its int8 part is the reference's bit for bit (same codes, exact sums, same float32
  products); its outlier columns sum in another order.
"""

from __future__ import annotations

import pytest
import torch

from qcompile.codegen.cpp import bnb4, launch, library, llm_int8, op
from qcompile.runtime import dispatch, ops
from qcompile.schemes import PackedWeight, parse_scheme
from qcompile.schemes.bnb4 import Bnb4

from cpp_required import skip_reason

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))

SCHEMES = ["bnb-nf4", "bnb-fp4", "bnb-nf4-dq", "bnb-fp4-dq-b128", "bnb-nf4-b32", "bnb-fp4-dq-b4096"]
# (M, K, N): odd K (every other row starts mid-byte), K under one chunk of 16, rows ragged against every block
SHAPES = [(1, 70, 33), (3, 197, 21), (5, 48, 9), (2, 7, 11), (4, 1, 5)]
TOLERANCE = {torch.float32: 5e-6, torch.bfloat16: 1e-2}
ISAS = library.available_isas() if skip_reason() is None else []


def _case(name, m, k, n, dtype=torch.float32, seed=0, bias=True):
    generator = torch.Generator().manual_seed(seed)
    scheme = parse_scheme(name)
    packed = scheme.pack(scheme.quantize(torch.randn(n, k, generator=generator))).list()
    x = torch.randn(m, k, generator=generator).to(dtype)
    return scheme, packed, x, torch.randn(n, generator=generator) if bias else None


def _assert_matches_reference(y, scheme, x, packed, bias):
    ref = ops.reference_linear(x, packed, bias, scheme.name, x.shape[-1], y.shape[-1])
    assert y.dtype == ref.dtype == x.dtype and y.shape == ref.shape
    tol = TOLERANCE[x.dtype]
    rms = ref.float().pow(2).mean().sqrt().item()
    error = ((y.float() - ref.float()).abs() / (ref.float().abs() + rms)).max().item()
    assert error <= tol, f"{scheme.name} {x.dtype}: worst relative error {error:.3g} > {tol}"
    if x.dtype == torch.bfloat16 and not scheme.quantizes_activations:
        exact = x.double() @ scheme.dequantize_packed(packed, y.shape[-1], x.shape[-1]).double().t()
        exact = exact + (0 if bias is None else bias.double())
        bound = 2.0**-8 * exact.abs() + 1e-5 * exact.pow(2).mean().sqrt()
        assert ((y.double() - exact).abs() <= bound).all(), f"{scheme.name}: off the float32 weight's exact product"


def _dequant_rows(scheme, packed, n, k, n0, n1):
    out = torch.empty(n1 - n0, k)
    call = launch.template("dequant_bnb4", k, n, len(packed), bnb4.params(scheme))
    for i, tensor in enumerate(packed):
        call.tensors[i] = tensor.data_ptr()
    call.y, call.threads = out.data_ptr(), 2
    call.ints[3], call.ints[4] = n0, n1
    assert library.kernel("dequant_bnb4")(call) == 0
    return out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", SCHEMES)
def test_kernel_matches_reference(name, dtype, isa, monkeypatch):
    monkeypatch.setenv(library.ISA_ENV, isa)
    for i, (m, k, n) in enumerate(SHAPES):
        scheme, packed, x, bias = _case(name, m, k, n, dtype, seed=i, bias=i % 2 == 0)
        y = bnb4.bind(scheme, x, packed, bias, n)(x, packed, bias)
        _assert_matches_reference(y, scheme, x, packed, bias)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", ["bnb-nf4", "bnb-fp4-dq", "bnb-nf4-dq-b32"])
def test_dequantized_rows_are_the_reference_weight(name, isa, monkeypatch):
    """Rows 3..20 of a weight with odd K, bit for bit (the blocks the slice touches, decoded by the kernel)."""
    monkeypatch.setenv(library.ISA_ENV, isa)
    scheme, packed, _, _ = _case(name, 1, 101, 29)
    ref = scheme.dequantize_packed(packed, 29, 101)
    assert torch.equal(_dequant_rows(scheme, packed, 29, 101, 3, 20), ref[3:20])


def test_every_dynamic_map_code_decodes_as_the_scheme_does():
    """Double-quantized absmax codes 0..255 all present (a state written directly): the kernel's copy of the 8-bit
    map, and of both 4-bit tables, are the scheme's constants."""
    n, k = 64, 256  # 256 blocks of 64
    generator = torch.Generator().manual_seed(3)
    for quant_type in ("nf4", "fp4"):
        scheme = Bnb4(quant_type, True)
        packed = PackedWeight({
            "qweight": torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, generator=generator),
            "absmax": torch.randperm(256, generator=generator).to(torch.uint8),
            "nested_absmax": torch.tensor([0.75]), "nested_offset": torch.tensor([1.25]),
        }).list()  # fmt: skip
        assert torch.equal(_dequant_rows(scheme, packed, n, k, 0, n), scheme.dequantize_packed(packed, n, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["bnb-nf4-dq", "bnb-fp4-b128"])
def test_many_token_path_matches_reference(name, dtype, monkeypatch):
    """Slices of dequantized rows times the activation with torch's GEMM (several slices, the last one short)."""
    monkeypatch.setattr(bnb4, "GEMM_MIN_TOKENS", 4)
    monkeypatch.setattr(bnb4, "GEMM_SLICE_BYTES", 4 * 75 * 7)
    scheme, packed, x, bias = _case(name, 6, 75, 45, dtype, seed=11)
    y = bnb4.bind(scheme, x, packed, bias, 45)(x, packed, bias)
    _assert_matches_reference(y, scheme, x, packed, bias)


def test_op_dispatches_to_the_cpp_row_and_the_cpp_op_serves_repeat_calls():
    scheme, packed, x, bias = _case("bnb-nf4-dq", 3, 70, 33, seed=7)
    x = x.reshape(1, 3, 70)
    entry, reason = dispatch.select_kernel(scheme, x, packed)
    assert entry is not None and entry.name == "cpp-bnb4", reason
    first = torch.ops.qcompile.linear(x, packed, bias, scheme.name, 70, 33)
    before = op.stats()["fast"]
    second = torch.ops.qcompile.linear(x, packed, bias, scheme.name, 70, 33)
    if op.loaded():
        assert op.stats()["fast"] == before + 1
    assert first.shape == (1, 3, 33) and torch.equal(first, second)
    _assert_matches_reference(second.reshape(3, 33), scheme, x.reshape(3, 70), packed, bias)


# -- llm-int8 -----------------------------------------------------------------------------------------------------
def _llm_case(name, m, k, n, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    scheme = parse_scheme(name)
    packed = scheme.pack(scheme.quantize(torch.randn(n, k, generator=generator) * 0.1)).list()
    x = torch.randn(m, k, generator=generator)
    x[:, 2] *= 12  # an outlier column
    x[0, 5] = 9.0  # an outlier element in token 0 only
    return scheme, packed, x.to(dtype), torch.randn(n, generator=generator)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m, k, n", [(1, 70, 33), (6, 197, 21)])
def test_llm_int8_row_matches_reference(m, k, n, dtype, isa, monkeypatch):
    monkeypatch.setenv(library.ISA_ENV, isa)
    scheme, packed, x, bias = _llm_case("llm-int8", m, k, n, dtype, seed=m)
    y = llm_int8.bind(scheme, x, packed, bias, n)(x, packed, bias)
    _assert_matches_reference(y, scheme, x, packed, bias)


@pytest.mark.parametrize("isa", ISAS)
def test_llm_int8_int8_part_is_exact_on_both_paths(isa, monkeypatch):
    """Codes whose rows peak at 127 (the W8A8 kernel) and a row that peaks lower (torch's int8 matmul): both equal the
    exact integer sums times the weight step, bit for bit."""
    monkeypatch.setenv(library.ISA_ENV, isa)
    generator = torch.Generator().manual_seed(5)
    qweight = torch.randint(-127, 128, (13, 150), dtype=torch.int8, generator=generator)
    step = torch.rand(13, generator=generator)
    codes = torch.randint(-127, 128, (5, 150), dtype=torch.int8, generator=generator)
    codes[:, 0], codes[2] = 127, 0
    exact = (codes.double() @ qweight.double().t()).float() * step
    assert torch.equal(llm_int8.int8_part(codes, qweight, step), exact)
    codes[4].clamp_(-100, 100)
    exact = (codes.double() @ qweight.double().t()).float() * step
    assert torch.equal(llm_int8.int8_part(codes, qweight, step), exact)


def test_llm_int8_row_where_a_token_peaks_in_an_outlier_column():
    """Token 1's largest kept value lies in an outlier column (an outlier of token 0's): its codes peak below 127."""
    scheme, packed, x, bias = _llm_case("llm-int8-t4.5", 3, 64, 17, torch.float32, seed=9)
    x[:, 2] = torch.tensor([3.0, 4.0, 0.5])
    x[0, 40], x[1, 40] = 20.0, 4.4
    assert llm_int8.split_activations(x, 4.5)[0][1].abs().max() < 127
    entry, reason = dispatch.select_kernel(scheme, x, packed)
    assert entry is not None and entry.name == "cpp-llm-int8", reason
    _assert_matches_reference(torch.ops.qcompile.linear(x, packed, bias, scheme.name, 64, 17), scheme, x, packed,
                              bias)  # fmt: skip
