"""The C++ dispatcher kernel of ``qcompile::linear`` for CPU tensors (``codegen/cpp/op``).

It must serve exactly what the Python launcher serves, with the same kernel (so bit-identical results), hand
everything else back to Python, and follow the dispatch table and ``$QCOMPILE_CPU_ISA``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qcompile.codegen.cpp import integer, library, op
from qcompile.runtime import dispatch, ops
from qcompile.schemes import parse_scheme

from cpp_required import skip_reason

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


def _case(name, m, k, n, dtype=torch.float32, seed=0, bias=True):
    generator = torch.Generator().manual_seed(seed)
    scheme = parse_scheme(name)
    packed = scheme.pack(scheme.quantize(torch.randn(n, k, generator=generator)))
    x = torch.randn(1, m, k, generator=generator).to(dtype)
    b = torch.randn(n, generator=generator) if bias else None
    return scheme, packed, x, b


def _call(x, packed, bias, name):
    n = packed.scales.shape[0]
    return torch.ops.qcompile.linear(x, packed.list(), bias, name, x.shape[-1], n)


def _reference(x, packed, bias, name):
    return ops.reference_linear(x, packed.list(), bias, name, x.shape[-1], packed.scales.shape[0])


def _python_launcher(scheme, x, packed, bias):
    if scheme.quantizes_activations:
        bind = integer.w4a8_bind if scheme.name.startswith("w4a8") else integer.w8a8_bind
    else:
        bind = integer.weight_only_bind
    n = packed.scales.shape[0]
    return bind(scheme, x, packed.list(), bias, n)(x, packed.list(), bias)


CASES = [("int4-g32", 1, 100, 37), ("int4-g128-sym", 3, 257, 64), ("int8", 5, 130, 20), ("int8-asym", 1, 64, 9),
         ("w8a8", 7, 200, 33), ("w4a8-g32", 1, 100, 37), ("w4a8-g64-sym", 6, 256, 40)]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name, m, k, n", CASES)
def test_second_call_runs_in_cpp_and_matches_python_bit_for_bit(name, m, k, n, dtype):
    scheme, packed, x, bias = _case(name, m, k, n, dtype)
    _call(x, packed, bias, name)  # first call of the signature: Python validates and hands over the plan
    before = op.stats()["fast"]
    y = _call(x, packed, bias, name)
    assert op.stats()["fast"] == before + 1
    assert y.shape == (1, m, n) and y.dtype == dtype
    assert torch.equal(y, _python_launcher(scheme, x, packed, bias))
    ref = _reference(x, packed, bias, name)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.float().abs().max().item())


@pytest.mark.parametrize("variant", ["transposed x", "many tokens, GEMM path in Python"])
def test_calls_it_cannot_serve_go_back_to_python(variant):
    name = "int4-g32" if variant == "transposed x" else "w8a8"
    scheme, packed, x, bias = _case(name, 4, 64, 24)
    _call(x, packed, bias, name)
    if variant == "transposed x":
        x = torch.randn(64, 4).t().unsqueeze(0)
    else:  # w8a8's int8 GEMM and epilogue run in Python
        x = torch.randn(1, 300, 64)
    before = op.stats()
    y = _call(x, packed, bias, name)
    after = op.stats()
    assert after["fast"] == before["fast"] and after["fallback"] == before["fallback"] + 1
    ref = _reference(x, packed, bias, name)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name, bias", [("int4-g32", True), ("int8-asym", False), ("w4a8-g32", True)])
def test_many_tokens_take_the_gemm_path_in_cpp(name, bias, dtype, monkeypatch):
    """From the crossover on, a weight-only or W4A8 call runs dequantized slices and oneDNN's GEMM (W4A8: after its
    activation prologue) without returning to Python: the same slices and GEMMs as the Python path (bit for bit),
    several slices with the last one short."""
    monkeypatch.setattr(integer, "GEMM_SLICE_BYTES", 7 * 96 * (2 if dtype == torch.bfloat16 else 4))
    monkeypatch.setenv("QCOMPILE_GEMM_MIN_TOKENS", "16")
    scheme, packed, x, b = _case(name, 40, 96, 23, dtype, seed=3, bias=bias)
    if b is not None and dtype == torch.bfloat16:
        b = b.bfloat16()
    _call(x[:, :2], packed, b, name)  # the signature's first call hands over the plan
    before = op.stats()
    y = _call(x, packed, b, name)
    after = op.stats()
    assert after["fast"] == before["fast"] + 1 and after["fallback"] == before["fallback"]
    assert torch.equal(y, _python_launcher(scheme, x, packed, b))
    ref = _reference(x, packed, b, name)
    tol = 1.6e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol * ref.float().abs().max().item())


def test_bfloat16_model_with_a_bias_stays_in_cpp():
    scheme, packed, x, bias = _case("int8", 2, 64, 24, torch.bfloat16)
    bias = bias.bfloat16()
    _call(x, packed, bias, "int8")
    before = op.stats()["fast"]
    y = _call(x, packed, bias, "int8")
    assert op.stats()["fast"] == before + 1
    assert torch.equal(y, _python_launcher(scheme, x, packed, bias))
    ref = _reference(x, packed, bias, "int8")
    torch.testing.assert_close(y.float(), ref.float(), rtol=1.6e-2, atol=1.6e-2 * ref.float().abs().max().item())


def test_forced_isa_is_followed_and_checked(monkeypatch):
    scheme, packed, x, bias = _case("int4-g64", 2, 320, 70)
    for isa in library.available_isas():
        monkeypatch.setenv(library.ISA_ENV, isa)
        _call(x, packed, bias, "int4-g64")
        before = op.stats()["fast"]
        y = _call(x, packed, bias, "int4-g64")
        assert op.stats()["fast"] == before + 1
        assert torch.equal(y, _python_launcher(scheme, x, packed, bias)), isa
    monkeypatch.setenv(library.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="QCOMPILE_CPU_ISA"):
        _call(x, packed, bias, "int4-g64")


def test_plans_follow_the_dispatch_table():
    scheme, packed, x, bias = _case("int8", 2, 96, 16)
    _call(x, packed, bias, "int8")
    assert op.stats()["plans"] >= 1
    try:
        dispatch.unregister_kernel("cpp-w8a16")
        assert op.stats()["plans"] == 0
        before = op.stats()["fast"]
        y = _call(x, packed, bias, "int8")
        assert op.stats()["fast"] == before
        torch.testing.assert_close(y, _reference(x, packed, bias, "int8"))
    finally:
        for entry in integer.kernel_entries("int-weight-only"):
            dispatch.register_kernel(entry)


def test_gradients_still_flow_through_the_cpp_kernel():
    scheme, packed, x, bias = _case("int4-g32", 3, 64, 24)
    bias.requires_grad_(True)
    x.requires_grad_(True)
    y = _call(x, packed, bias, "int4-g32")
    y.pow(2).sum().backward()
    weight = scheme.dequantize_packed(packed, 24, 64)
    x2, b2 = x.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, weight, b2).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bias.grad, b2.grad, rtol=1e-4, atol=1e-4)


def test_second_process_reuses_the_cached_op_library():
    path = op.library_path(library.library_file())
    mtime = path.stat().st_mtime_ns
    code = "from qcompile.codegen.cpp import op; print(op.load())"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True,
                         check=True, timeout=120)  # fmt: skip
    assert out.stdout.split() == ["True"]
    assert path.stat().st_mtime_ns == mtime


def test_disabled_by_environment():
    code = "import os; from qcompile.codegen.cpp import op; print(op.load())"
    env = {**os.environ, op.ENV: "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         timeout=120)  # fmt: skip
    assert out.stdout.split() == ["False"]


def test_a_failed_build_fails_the_suite(tmp_path):
    """``cpp_required.skip_reason`` (what these tests skip on) raises when the compiler exists but the build fails,
    instead of turning a broken kernel library into skips; without a compiler it gives the one-line reason."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import cpp_required; print(cpp_required.skip_reason())"
    failing = tmp_path / "failing-cxx"
    failing.write_text("#!/bin/sh\necho 'error: planted compiler failure' >&2\nexit 1\n")
    failing.chmod(0o755)
    env = {**os.environ, "CXX": str(failing), "QCOMPILE_CACHE_DIR": str(tmp_path / "cache")}
    env.pop(op.ENV, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "planted compiler failure" in out.stderr, out.stderr[-2000:]
    env["CXX"] = "no-such-compiler-anywhere"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "no C++ compiler found" in out.stdout, out.stderr[-2000:]
    env[op.ENV] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and f"{op.ENV}=0" in out.stdout
