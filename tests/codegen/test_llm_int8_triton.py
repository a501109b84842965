"""The Triton ``llm-int8`` kernels (``codegen/triton/llm_int8.py``) against the scheme's reference
(``qcompile.schemes.llm_int8``, itself checked against bitsandbytes in ``tests/schemes/test_llm_int8.py``).

Without CUDA they run under ``TRITON_INTERPRET=1`` on small CPU tensors (set here before triton is imported).
Calls without an outlier column follow the reference operation by operation: bit for bit. With outlier columns the
float part's float32 sums run in another order: every output within one step of the activation dtype (float32:
1e-6 relative) plus 1e-6 of the reference's rms. Ragged M, N, K; float32, bfloat16, float16; with and without bias.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from qcompile.codegen.triton import common, llm_int8  # noqa: E402
from qcompile.schemes import parse_scheme  # noqa: E402
from qcompile.schemes.llm_int8 import split_activations  # noqa: E402

INTERPRETED = common.interpreting()
DEVICE = "cpu" if INTERPRETED else "cuda"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)
if INTERPRETED and type(llm_int8.llm_int8_linear_kernel).__name__ != "InterpretedFunction":
    pytest.skip("triton kernels were created before TRITON_INTERPRET=1 was set", allow_module_level=True)
pytestmark = pytest.mark.triton

SHAPES = [(1, 70, 45), (5, 130, 20), (17, 64, 33)]
ONE_STEP = {torch.float32: 1e-6, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _case(name, m, k, n, dtype, outliers, seed):
    scheme = parse_scheme(name)
    generator = torch.Generator().manual_seed(seed)
    packed = scheme.pack(scheme.quantize(torch.randn(n, k, generator=generator))).list()
    x = torch.randn(m, k, generator=generator)
    x = x.clamp(-3.0, 3.0)  # no outlier unless placed
    if outliers:
        x[0, 3] = 9.0  # an outlier in the first token: column 3 goes to float for every token
        x[-1, k - 1] = -7.5  # in the last column (the ragged K block)
        x[-1, 5] = 0.99 * scheme.threshold  # below the threshold: quantized
    bias = torch.randn(n, generator=generator)
    return scheme, packed, x.to(dtype), bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["llm-int8", "llm-int8-t4.5"])
@pytest.mark.parametrize("outliers", [False, True])
def test_triton_llm_int8_matches_reference(name, dtype, outliers):
    for i, (m, k, n) in enumerate(SHAPES):
        scheme, packed, x, bias = _case(name, m, k, n, dtype, outliers, seed=i)
        columns = split_activations(x, scheme.threshold)[2]
        assert bool(columns.any()) == outliers and (not outliers or int(columns.sum()) == 2)
        bias = bias if i % 2 == 0 else None
        expected = scheme.reference_linear(x, packed, bias, n)
        y = llm_int8.llm_int8_linear(scheme, x.to(DEVICE), [t.to(DEVICE) for t in packed],
                                     None if bias is None else bias.to(DEVICE), n).cpu()  # fmt: skip
        assert y.dtype == dtype
        if not outliers:
            assert torch.equal(y, expected), (name, m, k, n)
            continue
        rms = expected.float().pow(2).mean().sqrt().item()
        bound = ONE_STEP[dtype] * expected.float().abs() + 1e-6 * rms
        assert bool(((y.float() - expected.float()).abs() <= bound).all()), (name, m, k, n)


def test_triton_llm_int8_row_and_errors():
    scheme, packed, x, bias = _case("llm-int8", 2, 64, 16, torch.float32, True, seed=0)
    (row,) = llm_int8.kernel_entries("llm-int8")
    assert row.device_type == "cuda" and row.name == "triton-llm-int8"
    assert llm_int8.kernel_entries("int-weight-only") == []
    if DEVICE == "cpu":
        assert "CUDA" in row.supports(scheme, x, packed)
    with pytest.raises(ValueError, match=r"qweight must be int8 \[16, 64\], got torch.int8 \[16, 32\]"):
        llm_int8.llm_int8_linear(scheme, x.to(DEVICE), [packed[0][:, :32].to(DEVICE), packed[1].to(DEVICE)], None, 16)
    with pytest.raises(ValueError, match="activations must be float16, bfloat16 or float32, got torch.float64"):
        llm_int8.llm_int8_linear(scheme, x.double().to(DEVICE), [t.to(DEVICE) for t in packed], None, 16)
    y = llm_int8.llm_int8_linear(scheme, x[:0].to(DEVICE), [t.to(DEVICE) for t in packed], None, 16)
    assert y.shape == (0, 16)
