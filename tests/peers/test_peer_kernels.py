"""Kernels of the peer families (quanto, torchao, eetq) against their plain-PyTorch reference, ragged shapes.

* ``linear_peer_a8`` (C++, ``codegen/cpp/kernels/peer_a8.h``) and the Triton int8-activation kernels
  (``codegen/triton/peers.py``) follow the reference operation by operation: bit for bit, every ISA the CPU runs,
  float32 / bfloat16 (and float16 for Triton), with and without bias, tokens at the clamp and on rounding ties.
* ``linear_peer_wo`` (C++, ``codegen/cpp/kernels/peer_wo.h``: quanto 2-bit grids, quanto / torchao weight-only
  fp8) decodes each weight as the reference does for the activation dtype, so only the float32 sums run in another
  order: float32 activations agree to 5e-5 of the reference's rms, bfloat16 ones to one bfloat16 step (2**-7
  relative); every e4m3 byte decodes exactly (checked against float64), every ISA the CPU runs.
* ``linear_peer_fp8a8`` (C++, same header: torchao ``fp8-a8``) quantizes activations as the reference (each code
  checked against torch's float -> e4m3 cast, ties and carries included); exact e4m3 products, float32 sums in
  another order: within one step of the activation dtype.
* torchao ``fp8-a8`` with bfloat16 / float16 activations and quanto's 2-bit grids (Triton, ``codegen/triton/
  peers.py``): the reference's rounding, float32 sums in another order: one step of the activation dtype.
* Weight-only peer schemes run the layout family's kernels (``codegen/layout_rows.py``). Those keep float32
  weights; the reference rounds each weight to the activation dtype first (the peer's weight), so float32
  activations agree to float32 summation (5e-5 of the reference's rms, as ``tests/codegen/test_cpp_kernels.py``
  allows) and bfloat16 ones to bfloat16 rounding (1.6e-2).
* ONNX: weight-only forms lower to their layout's form (checked eagerly against the reference); ``-a8`` forms give
  an error naming the layer.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import qcompile  # noqa: F401  (registers torch.ops.qcompile.linear)
from qcompile.algorithms import get_algorithm
from qcompile.runtime import dispatch
from qcompile.schemes import parse_scheme

A8 = ["quanto-int8-a8", "quanto-int8-a8-fp16", "quanto-int8-a8-fp32", "torchao-int8-a8", "torchao-int8-a8-fp32"]
WEIGHT_ONLY = ["quanto-int4-g128", "quanto-int4-g64-fp16", "quanto-int4", "quanto-int8", "torchao-int4-g32",
               "torchao-int8", "eetq-int8"]  # fmt: skip
SHAPES = [(1, 100, 37), (3, 257, 64), (5, 130, 20), (17, 200, 33)]
TOLERANCE = {torch.float32: 5e-5, torch.bfloat16: 1.6e-2}


def _packed(name, n, k, seed):
    scheme = parse_scheme(name)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator)
    q = scheme.quantize_with_input_absmax(weight, 3.5) if scheme.static_input else scheme.quantize(weight)
    return scheme, scheme.pack(q).list()


def _inputs(m, k, n, dtype, seed):
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=generator) * 1.2
    x[0, :6] = torch.tensor([0.5, 1.5, -2.5, 200.0, -200.0, 0.0]) * (3.5 / 127)  # ties of x / s, the clamp
    if m > 2:
        x[2] = 0.0  # a zero token (torchao clamps its scale to float32 eps)
    return x.to(dtype), torch.randn(n, generator=generator)


def _cpp_ready() -> bool:
    from qcompile.codegen import cpp

    return os.environ.get("QCOMPILE_CPU_OP", "1") != "0" and cpp.available()


cpp_only = pytest.mark.skipif(not _cpp_ready(), reason="the C++ kernels are switched off or have no compiler")


def _isas():
    if not _cpp_ready():
        return []
    from qcompile.codegen.cpp import library

    return library.available_isas()


@cpp_only
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", A8)
def test_cpp_a8_kernel_is_bit_exact(name, dtype, isa, monkeypatch):
    from qcompile.codegen.cpp import library, peers

    monkeypatch.setenv(library.ISA_ENV, isa)
    for i, (m, k, n) in enumerate(SHAPES):
        scheme, packed = _packed(name, n, k, seed=i)
        x, bias = _inputs(m, k, n, dtype, seed=i)
        bias = bias if i % 2 == 0 else None
        assert peers.a8_supports(scheme, x, packed) is None
        y = peers.a8_bind(scheme, x, packed, bias, n)(x, packed, bias)
        expected = scheme.reference_linear(x, packed, bias, n)
        assert y.dtype == expected.dtype and torch.equal(y, expected), (name, m, k, n, isa)


@cpp_only
@pytest.mark.parametrize("name", ["quanto-int8-a8", "torchao-int8-a8"])
def test_cpp_a8_threads_agree(name):
    from qcompile.codegen.cpp import peers

    scheme, packed = _packed(name, 301, 384, seed=5)
    x, bias = _inputs(6, 384, 301, torch.float32, seed=5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = peers.a8_bind(scheme, x, packed, bias, 301)(x, packed, bias)
        torch.set_num_threads(2)
        two = peers.a8_bind(scheme, x, packed, bias, 301)(x, packed, bias)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


PEER_WO = ["quanto-int2-g64", "quanto-int2-g128-fp16", "quanto-int2", "quanto-fp8", "quanto-fp8-fp32", "torchao-fp8",
           "torchao-fp8-fp16"]  # fmt: skip
ONE_STEP = {torch.float32: 5e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _assert_within_one_step(y, expected, dtype, where):
    """Every output within ``ONE_STEP[dtype]`` of the reference, relative (plus 1e-5 of its rms)."""
    rms = expected.float().pow(2).mean().sqrt().item()
    bound = ONE_STEP[dtype] * expected.float().abs() + 1e-5 * rms
    assert y.dtype == expected.dtype and bool(((y.float() - expected.float()).abs() <= bound).all()), where


@cpp_only
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", PEER_WO)
def test_cpp_peer_wo_kernel_matches_reference(name, dtype, isa, monkeypatch):
    from qcompile.codegen.cpp import library, peers

    monkeypatch.setenv(library.ISA_ENV, isa)
    for i, (m, k, n) in enumerate(SHAPES):
        scheme, packed = _packed(name, n, k, seed=i)
        x, bias = _inputs(m, k, n, dtype, seed=i)
        bias = bias if i % 2 == 0 else None
        assert peers.wo_supports(scheme, x, packed) is None
        y = peers.wo_bind(scheme, x, packed, bias, n)(x, packed, bias)
        expected = scheme.reference_linear(x, packed, bias, n)
        _assert_within_one_step(y, expected, dtype, (name, m, k, n, isa))


@cpp_only
@pytest.mark.parametrize("isa", _isas())
def test_cpp_peer_wo_decodes_every_e4m3_byte(isa, monkeypatch):
    """Row ``n`` holds byte ``n`` (every one but the two NaNs) in each of its K = 5 columns; with x = 1 each output is
    ``5 * e4m3(n) * scale``, exact in float32 (float64 expectation from the bits)."""
    from qcompile.codegen.cpp import library, peers

    monkeypatch.setenv(library.ISA_ENV, isa)
    codes = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    sign = torch.where(codes >= 128, -1.0, 1.0).double()
    exponent, mantissa = ((codes >> 3) & 15).double(), (codes & 7).double()
    value = torch.where(exponent == 0, mantissa * 2.0**-9, (8 + mantissa) * torch.exp2(exponent - 10)) * sign
    scheme, n, k = parse_scheme("quanto-fp8-fp32"), codes.numel(), 5
    qweight = codes.unsqueeze(1).expand(n, k).contiguous().view(torch.float8_e4m3fn)
    scales = torch.full((n, 1), 0.375)
    packed = [qweight, scales]
    x = torch.ones(1, k)
    y = peers.wo_bind(scheme, x, packed, None, n)(x, packed, None)
    assert torch.equal(y[0].double(), value * 5 * 0.375)


FP8_A8 = ["torchao-fp8-a8", "torchao-fp8-a8-fp16", "torchao-fp8-a8-fp32"]


@cpp_only
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", FP8_A8)
def test_cpp_fp8a8_kernel_matches_reference(name, dtype, isa, monkeypatch):
    from qcompile.codegen.cpp import library, peers

    monkeypatch.setenv(library.ISA_ENV, isa)
    for i, (m, k, n) in enumerate(SHAPES):
        scheme, packed = _packed(name, n, k, seed=i)
        x, bias = _inputs(m, k, n, dtype, seed=i)
        bias = bias if i % 2 == 0 else None
        assert peers.fp8a8_supports(scheme, x, packed) is None
        y = peers.fp8a8_bind(scheme, x, packed, bias, n)(x, packed, bias)
        _assert_within_one_step(y, scheme.reference_linear(x, packed, bias, n), dtype, (name, m, k, n, isa))


@cpp_only
@pytest.mark.parametrize("isa", _isas())
def test_cpp_fp8a8_codes_equal_torch_cast(isa, monkeypatch):
    """One token whose absmax is 448 (scale 1) holding e4m3 ties, carries into the next binade and subnormals; the
    weight is the identity (code 1.0, scale 1), so output n is the kernel's code of x[n]: torch's cast's value."""
    from qcompile.codegen.cpp import library, peers

    monkeypatch.setenv(library.ISA_ENV, isa)
    values = [448.0, -1.0625, 1.1875, 15.75, -15.7, 0.0146484375, 2.0**-10, 3 * 2.0**-10, -2.0**-11 * 0.9, 240.5,
              232.0, 0.0, -447.0, 1e-30, 0.3330078125, 104.0, 19.5, -6.25]  # fmt: skip
    x = torch.tensor([values])
    n = len(values)
    packed = [torch.eye(n).to(torch.float8_e4m3fn), torch.ones(n, 1)]
    scheme = parse_scheme("torchao-fp8-a8-fp32")
    y = peers.fp8a8_bind(scheme, x, packed, None, n)(x, packed, None)
    assert torch.equal(y[0], x[0].to(torch.float8_e4m3fn).to(torch.float32))


@cpp_only
def test_cpp_peer_wo_threads_agree_and_rows_are_chosen():
    from qcompile.codegen.cpp import peers

    scheme, packed = _packed("quanto-int2-g64", 301, 200, seed=5)
    x, bias = _inputs(6, 200, 301, torch.float32, seed=5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = peers.wo_bind(scheme, x, packed, bias, 301)(x, packed, bias)
        torch.set_num_threads(2)
        two = peers.wo_bind(scheme, x, packed, bias, 301)(x, packed, bias)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    for name in PEER_WO:
        scheme, packed = _packed(name, 20, 130, seed=1)
        x, bias = _inputs(3, 130, 20, torch.bfloat16, seed=1)
        row = dispatch.choose_kernel(name, x, packed, bias, 130, 20)
        assert row is not None and row.name == f"cpp-{scheme.family}-wo", (name, row)
        y = torch.ops.qcompile.linear(x, packed, bias, name, 130, 20)
        _assert_within_one_step(y, scheme.reference_linear(x, packed, bias, 20), torch.bfloat16, name)
        assert torch.equal(torch.ops.qcompile.linear(x, packed, bias, name, 130, 20), y)  # the C++ op's plan
    for name, dtype in [("torchao-fp8-a8", torch.bfloat16), ("torchao-fp8-a8-fp32", torch.float32)]:
        scheme, packed = _packed(name, 20, 130, seed=1)
        x, bias = _inputs(3, 130, 20, dtype, seed=1)
        assert dispatch.choose_kernel(name, x, packed, bias, 130, 20).name == "cpp-torchao-fp8-a8"
        y = torch.ops.qcompile.linear(x, packed, bias, name, 130, 20)
        _assert_within_one_step(y, scheme.reference_linear(x, packed, bias, 20), dtype, name)
        assert torch.equal(torch.ops.qcompile.linear(x, packed, bias, name, 130, 20), y)


EXPECTED_CPU_ROW = {"quanto-int4-g128": "quanto:cpp-w4a16", "quanto-int4-g64-fp16": "quanto:cpp-w4a16",
                    "quanto-int4": "quanto:cpp-w4a16", "quanto-int8": "quanto:cpp-w8a16",
                    "torchao-int4-g32": "torchao:cpp-w4a16", "torchao-int8": "torchao:cpp-w8a16",
                    "eetq-int8": "eetq:cpp-w8a16"}  # fmt: skip


@cpp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", WEIGHT_ONLY)
def test_cpp_layout_rows_serve_weight_only_peers(name, dtype):
    for i, (m, k, n) in enumerate(SHAPES):
        scheme, packed = _packed(name, n, k, seed=i)
        x, bias = _inputs(m, k, n, dtype, seed=i)
        row = dispatch.choose_kernel(name, x, packed, bias, k, n)
        assert row is not None and row.name == EXPECTED_CPU_ROW[name]
        y = torch.ops.qcompile.linear(x, packed, bias, name, k, n)
        expected = scheme.reference_linear(x, packed, bias, n)
        rms = expected.float().pow(2).mean().sqrt().item()
        torch.testing.assert_close(y.float(), expected.float(), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * rms)


@cpp_only
@pytest.mark.parametrize("name, dtype, reasons", [
    ("quanto-int2-g64", torch.float16, ["2-bit weights have no C++ kernel", "take float32 or bfloat16"]),
    ("quanto-fp8", torch.float16, ["keeps the fp8 layout", "take float32 or bfloat16"]),
    ("torchao-fp8-a8", torch.float16, ["no kernel of another family", "has token-fp8",
                                       "takes weight-only quanto int2 and fp8 weights", "take float32 or bfloat16"]),
])  # fmt: skip
def test_cpu_calls_without_a_kernel_say_why(name, dtype, reasons):
    scheme, packed = _packed(name, 16, 64, seed=3)
    entry, why = dispatch.select_kernel(scheme, torch.randn(2, 64).to(dtype), packed)
    assert entry is None and all(reason in why for reason in reasons), why


# -- Triton (interpreter on CPU; CUDA in `make test-gpu`) ------------------------------------------------------------
def _triton_device():
    from qcompile.codegen.triton import common

    return "cpu" if common.interpreting() else "cuda"


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", A8)
def test_triton_a8_kernel_is_bit_exact(name, dtype):
    pytest.importorskip("triton")
    from qcompile.codegen.triton import peers

    device = _triton_device()
    for i, (m, k, n) in enumerate([(1, 70, 45), (5, 130, 20), (17, 64, 33)]):
        scheme, packed = _packed(name, n, k, seed=i)
        x, bias = _inputs(m, k, n, dtype, seed=i)
        bias = bias if i % 2 == 0 else None
        expected = scheme.reference_linear(x, packed, bias, n)
        packed = [t.to(device) for t in packed]
        y = peers.a8_linear(scheme, x.to(device), packed, None if bias is None else bias.to(device), n)
        assert y.dtype == dtype and torch.equal(y.cpu(), expected), (name, m, k, n)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["quanto-int2-g64", "quanto-int2-g128-fp16", "quanto-int2"])
def test_triton_int2_kernel_matches_reference(name, dtype):
    pytest.importorskip("triton")
    from qcompile.codegen.triton import peers

    device = _triton_device()
    for i, (m, k, n) in enumerate([(1, 100, 37), (5, 130, 20), (17, 64, 33)]):
        scheme, packed = _packed(name, n, k, seed=i)
        x, bias = _inputs(m, k, n, dtype, seed=i)
        bias = bias if i % 2 == 0 else None
        expected = scheme.reference_linear(x, packed, bias, n)
        packed = [t.to(device) for t in packed]
        y = peers.int2_linear(scheme, x.to(device), packed, None if bias is None else bias.to(device), n)
        _assert_within_one_step(y.cpu(), expected, dtype, (name, m, k, n))
    row = {e.name: e for e in peers.kernel_entries("quanto")}["triton-quanto-int2"]
    assert row.device_type == "cuda" and "weight-only quanto int2" in row.supports(parse_scheme("quanto-int8"), x, [])
    rows = packed[0].shape[1]
    with pytest.raises(ValueError, match=rf"qweight must be uint8 \[33, {rows}\], got torch.uint8 \[33, 8\]"):
        peers.int2_linear(scheme, x.to(device), [packed[0][:, :8], *packed[1:]], None, n)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name", ["torchao-fp8-a8", "torchao-fp8-a8-fp16"])
def test_triton_fp8_a8_kernel_matches_reference(name, dtype):
    pytest.importorskip("triton")
    from qcompile.codegen.triton import peers

    device = _triton_device()
    for i, (m, k, n) in enumerate([(1, 70, 45), (5, 130, 20), (17, 64, 33)]):
        scheme, packed = _packed(name, n, k, seed=i)
        x, bias = _inputs(m, k, n, dtype, seed=i)
        bias = bias if i % 2 == 0 else None
        expected = scheme.reference_linear(x, packed, bias, n)
        packed = [t.to(device) for t in packed]
        y = peers.fp8_a8_linear(scheme, x.to(device), packed, None if bias is None else bias.to(device), n)
        _assert_within_one_step(y.cpu(), expected, dtype, (name, m, k, n))
    entries = {e.name: e for e in peers.kernel_entries("torchao")}
    cpu_x = torch.randn(2, 64).to(dtype)
    reason = entries["triton-torchao-fp8-a8"].supports(scheme, cpu_x, packed)
    assert reason is not None and "CUDA" in reason


@pytest.mark.triton
@pytest.mark.parametrize("name, row, m", [("quanto-int4-g64", "triton-int4-gemv", 1),
                                          ("torchao-int4-g128", "triton-int4-gemm", 17),
                                          ("quanto-int8", "triton-w8a16-gemv", 2),
                                          ("eetq-int8", "triton-w8a16-gemm", 17),
                                          ("quanto-fp8", "triton-w8a16-gemv", 1),
                                          ("torchao-fp8-a8-fp32", "triton-w8a8-gemm", 5)])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_layout_rows_serve_peers(name, row, m, dtype):
    """The layout family's Triton rows, bound to the peer scheme (as dispatch binds them on CUDA)."""
    pytest.importorskip("triton")
    from qcompile.codegen.triton import peers

    scheme, packed = _packed(name, 45, 96, seed=1)
    x, bias = _inputs(m, 96, 45, dtype, seed=1)
    if scheme.kernel_layout(dtype) is None:
        assert dtype != torch.float32 and scheme.quantizes_activations
        return
    entry = {e.name: e for e in peers.kernel_entries(scheme.family)}[f"{scheme.family}:{row}"]
    device = _triton_device()
    packed_d, x_d, bias_d = [t.to(device) for t in packed], x.to(device), bias.to(device)
    y = entry.bind(scheme, x_d, packed_d, bias_d, 45)(x_d, packed_d, bias_d).cpu()
    expected = scheme.reference_linear(x, packed, bias, 45)
    error = ((y.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
    assert y.dtype == dtype and error < (1e-5 if dtype == torch.float32 else 2e-2)


# -- ONNX, the algorithm -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["quanto-int4-g128", "quanto-int2-g64-fp16", "quanto-int8", "quanto-fp8-fp32",
                                  "torchao-int4-g32", "torchao-int8", "torchao-fp8", "eetq-int8"])  # fmt: skip
@pytest.mark.parametrize("k", [80, 160])
def test_onnx_layout_matches_reference(name, k):
    from qcompile.onnx.base import ExportOptions
    from qcompile.onnx.families import lower_site

    scheme = parse_scheme(name)
    packed = scheme.pack(scheme.quantize(torch.randn(24, k, generator=torch.Generator().manual_seed(0))))
    lowering = lower_site("layer", scheme, packed, k, ExportOptions("matmulnbits"))
    x, bias = torch.randn(3, 5, k), torch.randn(24)
    got = lowering.op(x, *lowering.tensors.values(), bias, *lowering.attrs)
    torch.testing.assert_close(got, scheme.reference_linear(x, packed.list(), bias, 24), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["quanto-int8-a8", "torchao-int8-a8", "torchao-fp8-a8"])
def test_onnx_refuses_runtime_activation_forms_naming_the_layer(name):
    from qcompile.onnx.base import ExportOptions, OnnxExportError
    from qcompile.onnx.families import lower_site

    scheme = parse_scheme(name)
    packed = scheme.pack(scheme.quantize(torch.randn(8, 64)))
    with pytest.raises(OnnxExportError) as error:
        lower_site("model.layers.3.mlp.up_proj", scheme, packed, 64, ExportOptions())
    for word in ("model.layers.3.mlp.up_proj", name, name.replace("-a8", "")):
        assert word in str(error.value)


def test_static_activations_algorithm_refuses_what_it_cannot_write():
    from qcompile.algorithms.stats import SiteStatistics

    run = get_algorithm("static-activations").run
    stats = SiteStatistics("layer", 16)
    stats.add(torch.randn(4, 16))
    with pytest.raises(ValueError, match="quanto-int8 has no static input scale"):
        run(parse_scheme("quanto-int8"), torch.randn(8, 16), stats, {})
    with pytest.raises(ValueError, match="saw no calibration inputs"):
        run(parse_scheme("quanto-int8-a8"), torch.randn(8, 16), SiteStatistics("layer", 16), {})
    q = run(parse_scheme("quanto-int8-a8-fp32"), torch.randn(8, 16), stats, {})
    assert torch.equal(q.input_scale, (stats.abs_max.max() / 127).reshape(1))


def test_fallback_notice_names_the_peer_scheme():
    scheme, packed = _packed("torchao-fp8-a8", 16, 64, seed=2)
    x = torch.randn(2, 64).to(torch.float16)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        y = torch.ops.qcompile.linear(x, packed, None, scheme.name, 64, 16)
    assert torch.equal(y, scheme.reference_linear(x, packed, None, 16))


class _Stack(torch.nn.Module):
    """Linears one after another (``name, in, out``), each followed by a bounded activation."""

    def __init__(self, layers):
        super().__init__()
        self.names = [name for name, *_ in layers]
        for name, k, n in layers:
            setattr(self, name, torch.nn.Linear(k, n))

    def forward(self, x):
        for name in self.names:
            x = torch.tanh(getattr(self, name)(x)) * 2
        return x


def test_exported_peer_model_runs_in_onnxruntime(tmp_path):
    """A model of weight-only peer layers (K ragged against the group) exported and run by onnxruntime, which the
    exporter compares with qcompile's output: within its bound at every output."""
    import onnx

    import qcompile.onnx

    layers = [("l0", 200, 48, "quanto-int4-g128"), ("l1", 48, 40, "torchao-int8"), ("l2", 40, 56, "eetq-int8"),
              ("l3", 56, 24, "quanto-fp8-fp32")]  # fmt: skip
    torch.manual_seed(0)
    recipe = {"default": None, "overrides": [{"targets": [name], "scheme": scheme} for name, _, _, scheme in layers]}
    model = _Stack([layer[:3] for layer in layers]).eval()
    program = qcompile.compile(model, (torch.randn(2, 5, 200),), recipe, progress_bar=False)
    path = tmp_path / "peers.onnx"
    report = qcompile.onnx.export(program, path=path)
    onnx.checker.check_model(str(path))
    assert report.comparisons and all(c.ok for c in report.comparisons) and report.max_abs_diff < 1e-3
