"""The Triton MX kernels (``mxfp6``, ``mxfp8``) against float64 math written from the formats' definitions.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` on small CPU tensors (set here before triton is imported).
The reference decodes codes and scales bit by bit (``tests/schemes/definitions.py``: element fields, E8M0
``2^(s-127)``, the fp6 byte order) and quantizes activations by a nearest-value search, all in float64.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from qcompile.codegen.triton import autotune, common, mx  # noqa: E402
from qcompile.schemes import parse_scheme  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "schemes"))
import definitions as spec  # noqa: E402  (the float64 definitions, tests/schemes/definitions.py)

INTERPRETED = common.interpreting()
DEVICE = "cpu" if INTERPRETED else "cuda"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)
if INTERPRETED and type(mx.mx_linear_kernel).__name__ != "InterpretedFunction":
    pytest.skip("triton kernels were created before TRITON_INTERPRET=1 was set", allow_module_level=True)
pytestmark = pytest.mark.triton

TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


# -- float64 reference -------------------------------------------------------------------------------------------
def make_packed(name: str, n: int, k: int, seed: int = 0, codes=None):
    """Random finite codes (zero in the padding columns) and E8M0 scales in ``[118, 130)``, in the scheme's layout."""
    scheme = parse_scheme(name)
    g = torch.Generator().manual_seed(seed)
    kp = scheme.padded_in_features(k)
    if codes is None:
        finite = len(scheme.fmt.finite)
        codes = torch.randint(0, finite, (n, kp), generator=g) | (torch.randint(0, 2, (n, kp), generator=g)
                                                                   << (scheme.bits - 1))  # fmt: skip
        codes[:, k:] = 0
    scales = torch.randint(118, 130, (n, kp // 32), generator=g).to(torch.uint8)
    return scheme, [scheme.pack_codes(codes.to(torch.uint8)).to(DEVICE), scales.to(DEVICE)]


def weight64(scheme, packed, k: int) -> np.ndarray:
    return spec.mx_weight(scheme, [t.cpu() for t in packed], packed[1].shape[0], k)


def reference64(scheme, x, packed, bias) -> torch.Tensor:
    """``y = act(x_p) @ W_p.T + bias`` in float64, from ``definitions.py``."""
    k = x.shape[-1]
    x64 = x.detach().cpu().double().reshape(-1, k).numpy()
    activation, _ = spec.mx_tokens(scheme, x64)
    y = activation @ weight64(scheme, packed, k).T
    if bias is not None:
        y = y + bias.cpu().double().numpy()
    return torch.from_numpy(y).reshape(*x.shape[:-1], -1)


def activation(m: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(dtype).to(DEVICE)


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.cpu().double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


# -- decoding: every code ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mxfp6-e3m2", "mxfp6-e2m3", "mxfp8-e4m3", "mxfp8-e5m2"])
def test_every_finite_code_decodes_exactly(name):
    """An identity activation reads the weight back: every finite code of the type (both signs; 64 / 256 codes
    less E4M3's NaN and E5M2's Inf / NaN) in every one of 16 rows' rotations, under E8M0 bytes 118 .. 129."""
    scheme = parse_scheme(name)
    finite = torch.tensor([c for c, v in enumerate(scheme.fmt.values) if math.isfinite(v)])
    k = 32 * -(-len(finite) // 32)
    codes = finite[(torch.arange(k)[None, :] + 5 * torch.arange(16)[:, None]) % len(finite)]
    scheme, packed = make_packed(name, 16, k, codes=codes)
    y = mx.mx_linear(torch.eye(k, device=DEVICE), packed, None, scheme, config=autotune.KernelConfig(16, 16, 32))
    np.testing.assert_array_equal(y.t().cpu().double().numpy(), weight64(scheme, packed, k))


def test_element_value_of_special_codes():
    """E4M3's S.1111.111 decodes to NaN, E5M2's exponent 11111 to Inf / NaN (the definition's values): a NaN code
    in a row makes that output NaN and leaves the others."""
    for name, code in (("mxfp8-e4m3", 0x7F), ("mxfp8-e5m2", 0x7C), ("mxfp8-e5m2", 0xFE)):
        codes = torch.zeros(16, 32, dtype=torch.uint8)
        codes[3, 5] = code
        scheme, packed = make_packed(name, 16, 32, codes=codes)
        x = torch.zeros(1, 32, device=DEVICE)
        x[0, 5] = 1.0
        y = mx.mx_linear(x, packed, None, scheme).cpu()
        expected = spec.mx_element_decode(np.array([code]), scheme.element)[0] * 2.0 ** (int(packed[1][3, 0]) - 127)
        assert np.array_equal(y[0, 3].double().numpy(), expected, equal_nan=True), (name, y[0, 3], expected)
        assert (y[0, torch.arange(16) != 3] == 0).all()


# -- the GEMM against the reference ------------------------------------------------------------------------------
CASES = [
    # name, dtype, m, k, n, bias
    ("mxfp6-e3m2", torch.float32, 1, 70, 48, False),
    ("mxfp6-e2m3", torch.float16, 17, 200, 33, True),
    ("mxfp6-e3m2-w6a6", torch.float32, 5, 70, 33, True),
    ("mxfp6-e2m3-w6a6", torch.bfloat16, 17, 96, 48, False),
    ("mxfp8-e4m3", torch.bfloat16, 5, 200, 33, True),
    ("mxfp8-e5m2", torch.float32, 17, 70, 48, False),
    ("mxfp8-e4m3-w8a8", torch.float16, 1, 96, 33, False),
    ("mxfp8-e5m2-w8a8", torch.float32, 5, 200, 48, True),
]


@pytest.mark.parametrize("name, dtype, m, k, n, with_bias", CASES)
def test_mx_linear_matches_float64_reference(name, dtype, m, k, n, with_bias):
    """Both paths (M <= 16 splits K; M = 17 is the tile path), ragged K (70, 200: padding inside the last group) and
    ragged N (33, 48 over 32-column tiles), bias or none, fp32, fp16 and bf16 activations."""
    scheme, packed = make_packed(name, n, k)
    x = activation(m, k, dtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE) if with_bias else None
    y = mx.mx_linear(x, packed, bias, scheme)
    assert y.shape == (m, n) and y.dtype == dtype and y.device.type == DEVICE
    error = relative_error(y, reference64(scheme, x, packed, bias))
    assert error < TOLERANCE[dtype], f"{name} {dtype}: relative error {error:.2e}"


def test_bfloat16_batched_and_split_configs():
    """bf16 activations with leading batch dims; one split, three splits (the last one short) and a 64-deep tile."""
    scheme, packed = make_packed("mxfp6-e3m2", 40, 160, seed=3)
    x = activation(6, 160, torch.bfloat16).reshape(2, 3, 160)
    ref = reference64(scheme, x, packed, None)
    for config in (autotune.KernelConfig(16, 32, 32), autotune.KernelConfig(16, 32, 32, split_k=3),
                   autotune.KernelConfig(16, 16, 64, split_k=2)):  # fmt: skip
        y = mx.mx_linear(x, packed, None, scheme, config=config)
        assert y.shape == (2, 3, 40) and y.dtype == torch.bfloat16
        assert relative_error(y, ref) < TOLERANCE[torch.bfloat16], config.label


# -- the activation quantizer ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mxfp6-e3m2-w6a6", "mxfp6-e2m3-w6a6", "mxfp8-e4m3-w8a8", "mxfp8-e5m2-w8a8"])
def test_activation_quantizer_matches_definition(name):
    """The quantize kernel against the float64 definition, exactly: random rows, a zero row, a row of exact ties
    (midpoints of neighbouring values, times 2**-3), values that saturate, a row whose groups span 2**-30 .. 2**30;
    ragged K = 150 over Kp = 160."""
    scheme = parse_scheme(name)
    finite = torch.tensor(scheme.fmt.finite)
    x = torch.randn(5, 150, generator=torch.Generator().manual_seed(5)) * 3
    x[1] = 0
    x[2, :31] = ((finite[1:] + finite[:-1]) / 2)[-31:] * 2.0**-3
    x[3, :32] = torch.linspace(-1.99, 1.99, 32) * scheme.fmt.max_value
    x[4] *= torch.exp2(torch.linspace(-30, 30, 150)).round()
    q = mx.quantize_activations(x.to(DEVICE), 160, scheme, torch.float32)
    expected, _ = spec.mx_tokens(scheme, x.double().numpy())
    np.testing.assert_array_equal(q.cpu().double().numpy(), expected)
    assert (q[:, 150:] == 0).all()


# -- bad input ---------------------------------------------------------------------------------------------------
def test_bad_input_is_refused_by_name():
    x = activation(2, 70, torch.float32)
    scheme, packed = make_packed("mxfp8-e4m3", 48, 70)
    with pytest.raises(ValueError, match=r"mx_linear\(mxfp8-e4m3\).*takes 2 packed tensors .*got 1"):
        mx.mx_linear(x, packed[:1], None, scheme)
    with pytest.raises(ValueError, match=r"qweight is uint8\[48, 96\], expected float8_e4m3fn\[48, 96\]"):
        mx.mx_linear(x, [packed[0].view(torch.uint8), packed[1]], None, scheme)
    six, p6 = make_packed("mxfp6-e3m2", 48, 70)
    with pytest.raises(ValueError, match=r"qweight is uint8\[48, 64\], expected uint8\[48, 72\]"):
        mx.mx_linear(x, [p6[0][:, :64], p6[1]], None, six)
    with pytest.raises(ValueError, match=r"bias is \[47\], expected \[48\]"):
        mx.mx_linear(x, packed, torch.zeros(47, device=DEVICE), scheme)
    with pytest.raises(ValueError, match="BLOCK_K a multiple of 32"):
        mx.mx_linear(x, packed, None, scheme, config=autotune.KernelConfig(16, 16, 16))
    with pytest.raises(TypeError, match="activations must be float16, bfloat16 or float32"):
        mx.mx_linear(x.double(), packed, None, scheme)
    with pytest.raises(ValueError, match="is a fp8 scheme, expected one of"):
        mx.mx_linear(x, packed, None, "fp8")


# -- dispatch rows and traced launches ---------------------------------------------------------------------------
def test_kernel_entries_are_cuda_rows_of_both_families():
    for family in ("mxfp6", "mxfp8"):
        (entry,) = mx.kernel_entries(family)
        assert entry.device_type == "cuda" and set(entry.families) == {"mxfp6", "mxfp8"} and entry.inline
    assert mx.kernel_entries("mxfp4") == []
    scheme = parse_scheme("mxfp6-e2m3")
    assert "not an MX 6- or 8-bit scheme" in mx.supports(parse_scheme("mxfp4"), torch.zeros(1, 64), [])
    assert "needs a CUDA tensor" in mx.supports(scheme, torch.zeros(1, 64), [])


def test_traced_launches_compute_the_op(monkeypatch):
    """In traced mode (what inductor records) both kernels go through ``wrap_triton`` and the result holds."""
    scheme, packed = make_packed("mxfp8-e5m2-w8a8", 48, 70)
    x = activation(3, 70, torch.float32)
    wrapped = []
    monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: wrapped.append(kernel.fn.__name__) or kernel)
    with common.traced_launches():
        y = mx.mx_linear(x, packed, None, scheme)
    assert wrapped == ["mx_quantize_kernel", "mx_linear_kernel"]
    assert relative_error(y, reference64(scheme, x, packed, None)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("name", ["mxfp6-e3m2", "mxfp6-e2m3-w6a6", "mxfp8-e4m3", "mxfp8-e5m2-w8a8"])
def test_dispatch_row_matches_scheme_reference(name):
    """Weights the scheme itself quantized and packed, through the row's ``bind`` (launched twice, the second time
    on other activations): the kernel, the scheme's ``reference_linear`` and the float64 definition agree."""
    scheme = parse_scheme(name)
    n, k = 48, 70
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(7))
    packed = [t.to(DEVICE) for t in scheme.pack(scheme.quantize(weight)).list()]
    bias = torch.randn(n, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    (entry,) = mx.kernel_entries(scheme.family)
    launch = entry.bind(scheme, activation(5, k, torch.float32), packed, bias, n)
    for seed in (1, 2):
        x = activation(5, k, torch.float32, seed=seed)
        y = launch(x, packed, bias)
        ref = scheme.reference_linear(x.cpu(), [t.cpu() for t in packed], bias.cpu(), n)
        assert relative_error(y, ref.double()) < 1e-5
        assert relative_error(y, reference64(scheme, x, packed, bias)) < 1e-5


# -- what the GPU would run: compiled for sm_90 without one ------------------------------------------------------
COMPILE_SCRIPT = """
import json, torch
from qcompile.codegen.triton import asm, mx
from qcompile.schemes import parse_scheme
rows = {}
cases = [("mxfp6-e3m2", 1, torch.bfloat16), ("mxfp8-e4m3", 1, torch.float16), ("mxfp6-e2m3-w6a6", 256, torch.bfloat16),
         ("mxfp8-e5m2-w8a8", 8, torch.float16)]
for name, m, dtype in cases:
    scheme = parse_scheme(name)
    packed = scheme.pack(scheme.quantize(torch.randn(256, 512) * 0.05)).list()
    with asm.record(mx, "mx_linear_kernel", "mx_quantize_kernel") as launches:
        mx.mx_linear(torch.randn(m, 512, dtype=dtype), packed, None, scheme)
    for launch in launches:
        stats = asm.code_stats(asm.compile_launch(launch))
        mma = sum(count for op, count in stats.loop_opcodes.items() if "MMA" in op)
        rows[f"{name} M={m} {launch.kernel.__name__}"] = {"spills": stats.spills, "shared": stats.shared, "mma": mma}
print(json.dumps(rows))
"""


def test_kernels_compile_for_sm90_without_spills():
    """The launches the launcher makes on a GPU (default configs, both families, both paths, the quantizer) compile
    for sm_90 with triton's own ptxas: no register spills, shared memory within an H100's 227 KB, and tensor-core
    MMAs in the GEMM's main loop. Runs in a subprocess: this module interprets kernels."""
    import subprocess

    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton ships no NVIDIA backend tools")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.splitlines()[-1])
    assert len(rows) == 6, rows  # four GEMMs and two quantize kernels
    for label, row in rows.items():
        assert row["spills"] == 0 and row["shared"] <= 227 * 1024, (label, row)
        if "linear" in label:
            assert row["mma"] > 0, (label, row)
