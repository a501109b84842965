"""The Triton ``bnb4`` kernel against a float64 reference decoded from bitsandbytes' flat layout.

Without CUDA the kernel runs under ``TRITON_INTERPRET=1`` on small CPU tensors (set here before triton is imported).
The reference reads element ``f = n K + k`` from the high nibble of byte ``f // 2`` (even ``f``) or the low one, its
block ``f // B``, the double-quantized absmax from its definition, all in float64 (``definitions.bnb4_weight``).

Tolerance, max |y - ref| / max |ref|: fp32 activations 1e-5 (fp32 weights and ``ieee`` dots, sums in another
order; a weight off by one code moves outputs by over 1e-3 here); fp16 2e-3 and bf16 1e-2 (the weights are rounded
to the activation dtype for the dot: 2**-11 and 2**-8 of each).
"""

from __future__ import annotations

import os
import pathlib
import sys

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "schemes"))  # the float64 definitions

import definitions  # noqa: E402
from qcompile.codegen.triton import autotune, bnb4, common  # noqa: E402
from qcompile.runtime import dispatch  # noqa: E402
from qcompile.schemes import parse_scheme  # noqa: E402

INTERPRETED = common.interpreting()
DEVICE = "cpu" if INTERPRETED else "cuda"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)
if INTERPRETED and type(bnb4.bnb4_linear_kernel).__name__ != "InterpretedFunction":
    pytest.skip("triton kernels were created before TRITON_INTERPRET=1 was set", allow_module_level=True)
pytestmark = pytest.mark.triton

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _case(name, m, k, n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    scheme = parse_scheme(name)
    packed = scheme.pack(scheme.quantize(torch.randn(n, k, generator=generator))).list()
    x = torch.randn(m, k, generator=generator)
    return scheme, packed, x, torch.randn(n, generator=generator)


def _reference(scheme, packed, x, bias, n):
    w = definitions.bnb4_weight(scheme, [t.cpu() for t in packed], n, x.shape[-1])
    return x.double().cpu().numpy() @ w.T + bias.double().cpu().numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name, m, k, n", [
    ("bnb-nf4", 1, 70, 33), ("bnb-fp4-dq", 3, 45, 21), ("bnb-nf4-dq-b32", 17, 100, 40), ("bnb-fp4-b128", 2, 7, 9),
])  # fmt: skip
def test_kernel_matches_the_layout(name, m, k, n, dtype):
    scheme, packed, x, bias = _case(name, m, k, n, seed=m + k)
    packed = [t.to(DEVICE) for t in packed]
    y = bnb4.bnb4_linear(x.to(DEVICE, dtype), packed, bias.to(DEVICE), name, n)
    assert y.dtype == dtype and y.shape == (m, n)
    expected = _reference(scheme, packed, x.to(dtype).float(), bias, n)
    error = np.abs(y.double().cpu().numpy() - expected).max() / np.abs(expected).max()
    assert error <= TOLERANCE[dtype], f"{name} {dtype}: {error:.3g} of max|y|"


def test_split_k_and_a_flipped_code():
    """K split over three programs sums to the same output; one flipped code of weight row 1 moves column 1 only."""
    scheme, packed, x, bias = _case("bnb-nf4-dq", 2, 99, 20, seed=4)
    config = autotune.KernelConfig(16, 32, 32, split_k=3, num_stages=1)
    packed_d = [t.to(DEVICE) for t in packed]
    y = bnb4.bnb4_linear(x.to(DEVICE), packed_d, bias.to(DEVICE), scheme, 20, config=config).double().cpu()
    expected = _reference(scheme, packed, x, bias, 20)
    assert np.abs(y.numpy() - expected).max() <= 1e-5 * np.abs(expected).max()
    flipped = [t.to(DEVICE) for t in definitions.perturb(packed, row=1, k=99)]
    moved = bnb4.bnb4_linear(x.to(DEVICE), flipped, bias.to(DEVICE), scheme, 20, config=config).double().cpu()
    assert ((moved - y).abs().amax(0) > 1e-6).tolist() == [i == 1 for i in range(20)]


def test_bad_calls_are_refused_by_name():
    scheme, packed, x, bias = _case("bnb-nf4", 2, 64, 8)
    with pytest.raises(ValueError, match=r"bnb4_linear\(bnb-nf4\): bnb-nf4: qweight is uint8\[256\], expected "
                                         r"uint8\[288\] for \[N=9, K=64\]"):  # fmt: skip
        bnb4.bnb4_linear(x, packed, None, scheme, 9)
    with pytest.raises(ValueError, match=r"nf4-g64 is a nf4 scheme, expected bnb4"):
        bnb4.bnb4_linear(x, packed, None, "nf4-g64", 8)
    with pytest.raises(TypeError, match=r"bnb4_linear\(bnb-nf4\): activations must be"):
        bnb4.bnb4_linear(x.to(torch.float64), packed, None, scheme, 8)


def test_the_row_takes_cuda_calls_only():
    entries = bnb4.kernel_entries("bnb4")
    assert [e.name for e in entries] == ["triton-bnb4"] and entries[0].device_type == "cuda"
    scheme, packed, x, _ = _case("bnb-fp4", 1, 32, 4)
    assert "needs a CUDA tensor" in bnb4.supports(scheme, x, packed)
    assert bnb4.kernel_entries("nf4") == []
    assert all(row.device_type != "cpu" or row.name != "triton-bnb4" for row in dispatch.registered_kernels())
