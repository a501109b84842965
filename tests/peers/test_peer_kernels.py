"""Kernels of the peer families (quanto, torchao, eetq) against their plain-PyTorch reference, ragged shapes.

* ``linear_peer_a8`` (C++, ``codegen/cpp/kernels/peer_a8.h``) and the Triton int8-activation kernels
  (``codegen/triton/peers.py``) follow the reference operation by operation: bit for bit, every ISA the CPU runs,
  float32 / bfloat16 (and float16 for Triton), with and without bias, tokens at the clamp and on rounding ties.
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
    ("quanto-int2-g64", torch.float32, ["2-bit weights have no C++ kernel"]),
    ("quanto-fp8", torch.float32, ["keeps the fp8 layout", "has none (weight-only)"]),
    ("torchao-fp8-a8", torch.bfloat16, ["no kernel of another family", "has token-fp8"]),
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
    scheme, packed = _packed("quanto-int2-g64", 16, 64, seed=2)
    x = torch.randn(2, 64)
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
