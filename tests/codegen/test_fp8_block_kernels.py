"""The ``fp8-block`` kernels against the scheme's reference (float64 group sums): the C++ CPU kernel on every ISA
variant this CPU runs, its GEMM path, and the Triton launcher (under ``TRITON_INTERPRET=1`` without CUDA).

Tolerances: the activation codes are the reference's bit for bit (checked directly); the kernels sum each group in
float32 where the reference sums exactly, so float32 outputs agree to 1e-5 of the output's rms (measured: <= 2e-6),
bfloat16 outputs to one bfloat16 rounding step (2**-7 relative).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qcompile.runtime import dispatch  # noqa: E402
from qcompile.schemes import parse_scheme  # noqa: E402
from qcompile.schemes.fp8_block import quantize_activations  # noqa: E402

from cpp_required import skip_reason  # noqa: E402

NAMES = ["fp8-block", "fp8-block-ue8m0"]
# (M, K, N): ragged K and N (partial groups and blocks), one K of whole groups, M across the 4-token tiles
SHAPES = [(1, 200, 130), (3, 70, 5), (17, 300, 260), (5, 256, 40)]


def wide_range(shape, seed: int) -> torch.Tensor:
    """Normal values times 10**U(-7, 0): small elements land on e4m3 subnormals or round to zero."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * torch.pow(10.0, -7 * torch.rand(shape, generator=generator))


def make_call(name: str, m: int, k: int, n: int, dtype, seed: int, with_bias: bool):
    scheme = parse_scheme(name)
    packed = scheme.pack(scheme.quantize(wide_range((n, k), seed))).list()
    x = (wide_range((m, k), seed + 1) * 4).to(dtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(seed)) if with_bias else None
    return scheme, packed, x, bias


def assert_matches_reference(y, scheme, x, packed, bias):
    ref = scheme.reference_linear(x, packed, bias, packed[0].shape[0])
    assert y.dtype == ref.dtype and y.shape == ref.shape
    rms = ref.float().pow(2).mean().sqrt().item()
    rtol = 0.0 if x.dtype == torch.float32 else 2.0**-7
    torch.testing.assert_close(y.float().cpu(), ref.float().cpu(), rtol=rtol, atol=1e-5 * rms)


# -- C++ ----------------------------------------------------------------------------------------------------------
needs_cpp = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


def _isas() -> list[str]:
    from qcompile.codegen.cpp import library

    return library.available_isas() if skip_reason() is None else []


@needs_cpp
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_cpp_kernel_matches_reference(name, dtype, isa, monkeypatch):
    from qcompile.codegen.cpp import fp8_block, library

    monkeypatch.setenv(library.ISA_ENV, isa)
    monkeypatch.setattr(fp8_block, "GEMM_MIN_TOKENS", 1000)  # every M through the direct kernel
    for i, (m, k, n) in enumerate(SHAPES):
        scheme, packed, x, bias = make_call(name, m, k, n, dtype, seed=i, with_bias=i % 2 == 0)
        y = fp8_block.bind(scheme, x, packed, bias, n)(x, packed, bias)
        assert_matches_reference(y, scheme, x, packed, bias)


@needs_cpp
@pytest.mark.parametrize("isa", _isas())
def test_cpp_kernel_decodes_every_code(isa, monkeypatch):
    """Weights of arbitrary bytes (every code but the two NaNs, subnormals included) and arbitrary block scales."""
    from qcompile.codegen.cpp import fp8_block, library

    monkeypatch.setenv(library.ISA_ENV, isa)
    scheme = parse_scheme("fp8-block")
    generator = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 256, (140, 150), generator=generator, dtype=torch.uint8)
    codes[codes == 0x7F] = 0x7E
    codes[codes == 0xFF] = 0xFE
    every = torch.tensor([c for c in range(256) if c not in (0x7F, 0xFF)], dtype=torch.uint8)
    codes[0], codes[1, :104] = every[:150], every[150:]  # each finite code at least once
    packed = [codes.view(torch.float8_e4m3fn), torch.rand(2, 2, generator=generator) + 0.1]
    x = torch.randn(2, 150, generator=generator)
    y = fp8_block.bind(scheme, x, packed, None, 140)(x, packed, None)
    assert_matches_reference(y, scheme, x, packed, None)


@needs_cpp
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("name", NAMES)
def test_cpp_helpers_are_exact(name, isa, monkeypatch):
    """``fake_quant_fp8_block`` gives float(xq) * s with the reference's codes and scales; ``dequant_fp8_block``
    decodes all 256 codes (NaN included) times the block scale; bit for bit on every ISA."""
    from qcompile.codegen.cpp import launch, library

    monkeypatch.setenv(library.ISA_ENV, isa)
    scheme = parse_scheme(name)
    for dtype in (torch.float32, torch.bfloat16):
        x = (wide_range((5, 300), seed=9) * 4).to(dtype)
        xq, s = quantize_activations(x, scheme.ue8m0)
        out = torch.empty(5, 300)
        call = launch.template("fake_quant_fp8_block", 300, 1, 0, (int(scheme.ue8m0),), (), dtype == torch.bfloat16)
        call.x, call.y, call.M, call.y_bf16, call.threads = x.data_ptr(), out.data_ptr(), 5, 0, 2
        assert library.kernel("fake_quant_fp8_block")(call) == 0
        assert torch.equal(out, xq.float() * s.repeat_interleave(128, 1)[:, :300])
    codes = torch.arange(300, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(2, 150)
    scales = torch.tensor([[0.5, 3.0]])
    out = torch.empty(2, 150)
    call = launch.template("dequant_fp8_block", 150, 2, 2, (0, 0, 2))
    call.tensors[0], call.tensors[1], call.y, call.threads = codes.data_ptr(), scales.data_ptr(), out.data_ptr(), 1
    assert library.kernel("dequant_fp8_block")(call) == 0
    expected = codes.view(torch.float8_e4m3fn).float() * torch.tensor([0.5] * 128 + [3.0] * 22)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    assert out.isnan().sum() == 2


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_cpp_gemm_path_matches_reference(name, dtype, monkeypatch):
    from qcompile.codegen.cpp import fp8_block

    monkeypatch.setattr(fp8_block, "GEMM_MIN_TOKENS", 4)
    monkeypatch.setattr(fp8_block, "GEMM_SLICE_BYTES", 4 * 300 * 128)  # slices of 128 rows, the last one short
    scheme, packed, x, bias = make_call(name, 9, 300, 260, dtype, seed=4, with_bias=True)
    y = fp8_block.bind(scheme, x, packed, bias, 260)(x, packed, bias)
    assert_matches_reference(y, scheme, x, packed, bias)


@needs_cpp
def test_cpp_one_and_two_threads_agree_exactly():
    from qcompile.codegen.cpp import fp8_block

    scheme, packed, x, bias = make_call("fp8-block", 6, 384, 301, torch.float32, seed=6, with_bias=True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fp8_block.bind(scheme, x, packed, bias, 301)(x, packed, bias)
        torch.set_num_threads(2)
        two = fp8_block.bind(scheme, x, packed, bias, 301)(x, packed, bias)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@needs_cpp
@pytest.mark.parametrize("name", NAMES)
def test_op_dispatches_to_the_cpp_row(name):
    scheme, packed, x, bias = make_call(name, 3, 200, 130, torch.float32, seed=7, with_bias=True)
    x = x.reshape(1, 3, 200)
    entry, reason = dispatch.select_kernel(scheme, x, packed)
    assert entry is not None and entry.name == "cpp-fp8-block", reason
    from qcompile.codegen.cpp import op

    fast = op.stats()["fast"]
    for _ in range(2):  # the second call runs the C++ op's remembered plan
        y = torch.ops.qcompile.linear(x, packed, bias, name, 200, 130)
        assert_matches_reference(y, scheme, x, packed, bias)
    assert not op.loaded() or op.stats()["fast"] > fast
    x16 = x.to(torch.float16)
    assert "float16" in dispatch.select_kernel(scheme, x16, packed)[1]


# -- Triton -------------------------------------------------------------------------------------------------------
def _triton():
    pytest.importorskip("triton")
    from qcompile.codegen.triton import common, fp8_block

    if common.interpreting() and type(fp8_block._kernels().fp8_block_gemm_kernel).__name__ != "InterpretedFunction":
        pytest.skip("triton kernels were created before TRITON_INTERPRET=1 was set")
    if not common.interpreting() and not torch.cuda.is_available():
        pytest.skip("no CUDA device and TRITON_INTERPRET is not 1")
    return common, fp8_block


def _device() -> str:
    from qcompile.codegen.triton import common

    return "cpu" if common.interpreting() else "cuda"


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_triton_launcher_matches_reference(name, dtype):
    common, fp8_block = _triton()
    for i, (m, k, n) in enumerate([(1, 200, 130), (3, 70, 5), (17, 256, 40)]):
        scheme, packed, x, bias = make_call(name, m, k, n, dtype, seed=10 + i, with_bias=i != 1)
        packed = [t.to(_device()) for t in packed]
        x, bias = x.to(_device()), None if bias is None else bias.to(_device())
        y = fp8_block.fp8_block_linear(x, *packed, bias, scheme)
        assert_matches_reference(y, scheme, x, packed, bias)


@pytest.mark.triton
@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_triton_split_k_matches_reference(split_k):
    common, fp8_block = _triton()
    scheme, packed, x, bias = make_call("fp8-block", 5, 600, 130, torch.float32, seed=20, with_bias=True)
    packed = [t.to(_device()) for t in packed]
    x, bias = x.to(_device()), bias.to(_device())
    y = fp8_block.fp8_block_linear(x.reshape(1, 5, 600), *packed, bias, scheme, split_k=split_k)
    assert_matches_reference(y, scheme, x.reshape(1, 5, 600), packed, bias)
    assert fp8_block.split_for(2, 5, 132) == 5 and fp8_block.split_for(200, 5, 132) == 1


@pytest.mark.triton
@pytest.mark.parametrize("name", NAMES)
def test_triton_activation_quantization_is_the_reference(name):
    common, fp8_block = _triton()
    ue8m0 = parse_scheme(name).ue8m0
    for dtype in (torch.float32, torch.bfloat16):
        x = (wide_range((4, 300), seed=21) * 4).to(dtype)
        x[2] = 0.0
        q, s = fp8_block.quantize_activations(x.to(_device()), ue8m0)
        ref_q, ref_s = quantize_activations(x, ue8m0)
        assert torch.equal(s.cpu(), ref_s)
        assert torch.equal(q.cpu().float(), ref_q.float())  # the interpreter may drop the sign of a zero code


@pytest.mark.triton
def test_triton_row_reasons():
    common, fp8_block = _triton()
    scheme = parse_scheme("fp8-block")
    assert [row.name for row in fp8_block.kernel_entries("fp8-block")] == ["triton-fp8-block"]
    assert fp8_block.kernel_entries("fp8-block")[0].device_type == "cuda"
    assert fp8_block.kernel_entries("fp8") == []
    assert "CUDA" in fp8_block.supports(scheme, torch.empty(2, 64), [])
    fake = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)
    original = common.device_capability
    try:
        common.device_capability = lambda device: (8, 6)
        assert "8.9" in fp8_block.supports(scheme, fake, [fake, fake])
        common.device_capability = lambda device: (9, 0)
        assert fp8_block.supports(scheme, fake, [fake, fake]) is None
        assert "float64" in fp8_block.supports(scheme, types.SimpleNamespace(device=fake.device, dtype=torch.float64),
                                               [])  # fmt: skip
    finally:
        common.device_capability = original


SASS_SCRIPT = """
import json, re, torch
from qcompile.codegen.triton import asm, fp8_block
from qcompile.schemes import parse_scheme
out = {}
for name, m, k, n, split in [("fp8-block", 64, 512, 256, 1), ("fp8-block-ue8m0", 1, 1024, 128, 4),
                             ("fp8-block", 3, 200, 130, 1)]:
    scheme = parse_scheme(name)
    packed = scheme.pack(scheme.quantize(torch.randn(n, k))).list()
    with asm.record(fp8_block._kernels(), "quantize_groups_kernel", "fp8_block_gemm_kernel") as launches:
        fp8_block.fp8_block_linear(torch.randn(m, k, dtype=torch.bfloat16), *packed, torch.randn(n), scheme,
                                   split_k=split)
    for launch in launches:
        compiled = asm.compile_launch(launch, 90)
        stats = asm.code_stats(compiled)
        sass = asm._cuobjdump(compiled.asm["cubin"], "-sass")
        out[f"{name} M={m} K={k} split={split} {launch.kernel.__name__}"] = {
            "spills": stats.spills, "qgmma": "QGMMA" in sass, "mma": bool(re.search(r"\\b[HQ]G?MMA", sass))}
print(json.dumps(out))
"""


def test_triton_kernels_compile_for_sm90():
    """The real compiler (no GPU needed): both kernels build for sm_90 without spills, the split form too, and the
    GEMM of 64 tokens on whole groups runs e4m3 warpgroup MMAs (QGMMA)."""
    pytest.importorskip("triton")
    from qcompile.codegen.triton import asm

    if not os.path.exists(os.path.join(os.path.dirname(asm.triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton ships no NVIDIA backend tools")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SASS_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.splitlines()[-1])
    assert len(rows) == 6
    for label, row in rows.items():
        assert row["spills"] == 0, label
        if "gemm" in label:
            assert row["mma"], label
    assert rows["fp8-block M=64 K=512 split=1 fp8_block_gemm_kernel"]["qgmma"]
