"""C++ CPU kernels of ``qcompile::linear`` against the plain-PyTorch reference.

Tolerances, measured over the shapes below (worst error / (|reference| + rms(reference))):
* float32 weight-only: <= 6e-6. Sources: summation order (blocked FMAs vs the BLAS), and the per-group zero
  correction ``scale * (sum u x - zero * sum x)`` that cancels a few bits. We allow 5e-5 (about 8x margin).
* bfloat16 weight-only: <= 6e-3. The reference rounds every weight to bfloat16 before its matmul and rounds the
  output; the kernel keeps float32 weights and rounds only the output (one bf16 ulp is 2**-8 = 3.9e-3). We
  allow 1.6e-2, torch's own bfloat16 tolerance.
* w8a8: bit-exact in both dtypes (same integer sums, same float operations in the same order).
* w4a8: the same int8 activation codes and exact integer group sums as the reference; the per-group float
  sum runs in float32 (the reference in float64), so the weight-only tolerances above apply.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from qcompile.codegen import cpp
from qcompile.codegen.cpp import build, gemm_path, integer, library
from qcompile.runtime import dispatch, ops
from qcompile.schemes import parse_scheme

from cpp_required import skip_reason

WEIGHT_ONLY = ["int8", "int8-g64", "int8-asym", "int4", "int4-g32", "int4-g128-sym", "int4-g24", "int4-g64-sym"]
W4A8 = ["w4a8-g32", "w4a8-g24-sym", "w4a8-g128", "w4a8"]
# (M, K, N): ragged everywhere; K=100 with g32/g64/g24 pads the last group; the last three have long rows (the
# AVX-512 W4A8 kernel's two-block steps, many groups per zero-point sum; K=9000 at one token: the weight-only
# kernel's 16-row tile, then single rows for the last 5 of N=21).
SHAPES = [(1, 100, 37), (3, 257, 64), (5, 130, 20), (17, 200, 33), (2, 1000, 16), (3, 2900, 24), (2, 4608, 19),
          (1, 9000, 21)]
TOLERANCE = {torch.float32: 5e-5, torch.bfloat16: 1.6e-2}
pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))
ISAS = library.available_isas() if skip_reason() is None else []


def _packed(name: str, n: int, k: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    scheme = parse_scheme(name)
    weight = torch.randn(n, k, generator=generator)
    return scheme, scheme.pack(scheme.quantize(weight))


def _inputs(m: int, k: int, n: int, dtype, seed: int):
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=generator).to(dtype)
    bias = torch.randn(n, generator=generator)
    return x, bias


def _run(name: str):
    """``run(scheme, x, packed, bias)``: the row's launcher for this one call, bound and called."""
    bind = integer.weight_only_bind
    if name == "w8a8":
        bind = integer.w8a8_bind
    elif name.startswith("w4a8"):
        bind = integer.w4a8_bind

    def run(scheme, x, packed, bias):
        n = packed.list()[1].shape[0]
        bias32 = None if bias is None else bias.float()
        return bind(scheme, x, packed.list(), bias32, n)(x, packed.list(), bias32)

    return run


def _assert_matches_reference(y, x, packed, bias, name):
    ref = ops.reference_linear(x, packed.list(), bias, name, x.shape[-1], y.shape[-1])
    assert y.dtype == ref.dtype and y.shape == ref.shape
    if name == "w8a8":
        torch.testing.assert_close(y, ref, rtol=0, atol=0)
        return
    tol = TOLERANCE[x.dtype]
    rms = ref.float().pow(2).mean().sqrt().item()
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol * rms)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", [*WEIGHT_ONLY, "w8a8", *W4A8])
def test_kernel_matches_reference(name, dtype, isa, monkeypatch):
    monkeypatch.setenv(library.ISA_ENV, isa)
    monkeypatch.setenv(gemm_path.ENV, "100000")  # the direct kernels at every token count
    run = _run(name)
    for i, (m, k, n) in enumerate(SHAPES):
        scheme, packed = _packed(name, n, k, seed=i)
        x, bias = _inputs(m, k, n, dtype, seed=i)
        bias = bias if i % 2 == 0 else None
        y = run(scheme, x, packed, bias)
        _assert_matches_reference(y, x, packed, bias, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["int8-asym", "int4-g24", "int4-g128-sym", "int4"])
def test_dequantize_gemm_path_matches_reference(name, dtype, monkeypatch):
    monkeypatch.setenv(gemm_path.ENV, "4")
    monkeypatch.setattr(integer, "GEMM_SLICE_BYTES", 4 * 100 * 7)  # several slices, the last one short
    scheme, packed = _packed(name, 45, 100, seed=11)
    x, bias = _inputs(6, 100, 45, dtype, seed=11)
    y = _run(name)(scheme, x, packed, bias)
    _assert_matches_reference(y, x, packed, bias, name)


@pytest.mark.parametrize("name", ["int8", "int4-g32", "w8a8", "w4a8-g32"])
def test_op_dispatches_to_cpp_kernel(name):
    scheme, packed = _packed(name, 48, 96, seed=7)
    x, bias = _inputs(3, 96, 48, torch.float32, seed=7)
    x = x.reshape(1, 3, 96)
    entry, reason = dispatch.select_kernel(scheme, x, packed.list())
    assert entry is not None and entry.name.startswith("cpp-"), reason
    y = torch.ops.qcompile.linear(x, packed.list(), bias, name, 96, 48)
    assert y.shape == (1, 3, 48)
    _assert_matches_reference(y, x, packed, bias, name)


@pytest.mark.parametrize("name, dtype", [("int3-g128", torch.float32), ("nf4-g64", torch.float32),
                                         ("int4-g32", torch.float16)])  # fmt: skip
def test_unsupported_calls_give_a_reason_and_fall_back(name, dtype):
    scheme, packed = _packed(name, 16, 64, seed=3)
    x = torch.randn(2, 64).to(dtype)
    entry, reason = dispatch.select_kernel(scheme, x, packed.list())
    assert entry is None and ("cpp-" in reason or "no fast kernel" in reason)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = torch.ops.qcompile.linear(x, packed.list(), None, name, 64, 16)
    torch.testing.assert_close(y, ops.reference_linear(x, packed.list(), None, name, x.shape[-1], 16))


@pytest.mark.parametrize("name, m, k", [("int4-g32", 3, 384), ("int8", 5, 384), ("int4", 20, 384), ("w8a8", 6, 384),
                                        ("w4a8-g64", 7, 384), ("int8", 2, 4608), ("int4-g128", 1, 9216)])
def test_one_and_two_threads_agree_exactly(name, m, k):
    scheme, packed = _packed(name, 301, k, seed=5)
    x, bias = _inputs(m, k, 301, torch.float32, seed=5)
    run = _run(name)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(scheme, x, packed, bias)
        torch.set_num_threads(2)
        two = run(scheme, x, packed, bias)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_isa_variants_agree_with_each_other(monkeypatch):
    scheme, packed = _packed("int4-g64", 70, 320, seed=9)
    x, _ = _inputs(2, 320, 70, torch.float32, seed=9)
    results = []
    for isa in ISAS:
        monkeypatch.setenv(library.ISA_ENV, isa)
        results.append(_run("int4-g64")(scheme, x, packed, None))
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-5, atol=1e-5)


def test_forcing_an_isa_is_checked(monkeypatch):
    monkeypatch.setenv(library.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="QCOMPILE_CPU_ISA"):
        library.active_isa()
    missing = [isa for isa in library.ISAS if isa not in ISAS]
    if missing:
        monkeypatch.setenv(library.ISA_ENV, missing[0])
        with pytest.raises(RuntimeError, match="cannot run it"):
            library.active_isa()
    monkeypatch.setenv(library.ISA_ENV, "scalar")
    assert library.active_isa() == "scalar"


def _probe(env: dict) -> list[str]:
    code = (
        "from qcompile.codegen.cpp import build, library; library.load(); "
        "print(build.builds_in_this_process); print(build.library_path())"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_second_process_reuses_the_cached_library():
    library.load()
    path = build.library_path()
    mtime = path.stat().st_mtime_ns
    builds, reported = _probe(dict(os.environ))
    assert builds == "0" and reported == str(path)
    assert path.stat().st_mtime_ns == mtime


def test_cold_build_into_a_fresh_cache(tmp_path, monkeypatch):
    """The build's mechanics (a fresh cache, no second build, no leftovers) on one small kernel file: the whole
    library's first build already happens in every fresh checkout's first test that loads it."""
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build, "kernel_headers", lambda: [build.KERNEL_DIR / "bandwidth.h"])
    before = build.builds_in_this_process
    path = build.build()
    assert path.is_file() and path.is_relative_to(tmp_path)
    assert build.builds_in_this_process == before + 1
    mtime = path.stat().st_mtime_ns
    assert build.build() == path and build.builds_in_this_process == before + 1
    assert path.stat().st_mtime_ns == mtime
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.startswith("build-")]
    assert leftovers == []  # the temporary build folder is removed; only the renamed library stays


def test_missing_compiler_is_reported(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(build.CompilerError, match="no C\\+\\+ compiler"):
        build.build()

    def no_library():
        raise build.CompilerError("no C++ compiler found")

    monkeypatch.setattr(library, "load", no_library)
    cpp.available.cache_clear()
    try:
        with pytest.warns(UserWarning, match="reference path"):
            assert integer.kernel_entries("int-weight-only") == []
    finally:
        monkeypatch.undo()
        cpp.available.cache_clear()
    assert [k.name for k in integer.kernel_entries("int-weight-only")] == ["cpp-w8a16", "cpp-w4a16"]


def test_kernel_table_holds_every_kernel_for_every_isa():
    """Kernels declare themselves once (QC_KERNEL); the table has each one for each ISA variant."""
    names = library.kernel_names()
    for kernel in ("linear_wo", "dequant_wo", "linear_w8a8", "linear_w4a8"):
        assert names.count(kernel) == len(library.ISAS), kernel
        assert library.has_kernel(kernel)
    assert not library.has_kernel("no_such_kernel")


BF16DP = skip_reason() is None and library.cpu_supports("avx512bf16")


@pytest.mark.skipif(not BF16DP, reason="this CPU has no AVX512-BF16: linear_wo_bf16 cannot run here")
@pytest.mark.parametrize("name", ["int4", "int4-g64", "int4-g128-sym", "int4-g128"])
def test_bf16_dot_product_kernel_matches_reference(name, monkeypatch):
    """linear_wo_bf16 (vdpbf16ps) serves int4 with bfloat16 activations; ragged M, N and K (padding columns)."""
    monkeypatch.setenv(gemm_path.ENV, "100000")
    for i, (m, k, n) in enumerate([(1, 576, 37), (3, 1000, 64), (5, 128, 20), (6, 250, 33)]):
        scheme, packed = _packed(name, n, k, seed=i)
        x, bias = _inputs(m, k, n, torch.bfloat16, seed=i)
        if scheme.group_size_for(k) % 64:
            continue
        assert integer.weight_only_kernel(scheme, x) == "linear_wo_bf16"
        bias = bias if i % 2 == 0 else None
        _assert_matches_reference(_run(name)(scheme, x, packed, bias), x, packed, bias, name)


@pytest.mark.skipif(not BF16DP, reason="this CPU has no AVX512-BF16: linear_wo_bf16 cannot run here")
def test_bf16_dot_product_kernel_one_and_two_threads_agree_exactly(monkeypatch):
    monkeypatch.setenv(gemm_path.ENV, "100000")
    scheme, packed = _packed("int4-g64", 301, 384, seed=5)
    x, bias = _inputs(5, 384, 301, torch.bfloat16, seed=5)
    assert integer.weight_only_kernel(scheme, x) == "linear_wo_bf16"
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_run("int4-g64")(scheme, x, packed, bias))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(*results)
