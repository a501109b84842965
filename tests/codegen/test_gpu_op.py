"""The registered op on a GPU, every family with Triton rows: CUDA tensors, ragged shapes, bf16 and fp16.

These run in ``make test-gpu`` (the Triton interpreter off); elsewhere they skip with one line. Shapes are
ragged against every tile and group (``K = 1000``, ``N = 383``) and ``M`` walks through every path's range.
Every call must be served by a CUDA row (a reference fallback on a GPU is a failure, except where a row states
that the device lacks what it needs, e.g. fp8 before compute capability 8.9), and must match the fp32 reference.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import qcompile  # noqa: F401 - registers the op
from qcompile.runtime import dispatch
from qcompile.runtime.ops import reference_linear
from qcompile.schemes import parse_scheme
from qcompile.schemes.registry import families

pytestmark = pytest.mark.gpu

K, N = 1000, 383
MS = (1, 3, 9, 33, 130)
#: the kernel modules of a family that hold its Triton rows
TRITON = "qcompile.codegen.triton"
#: schemes of those families that no Triton row serves yet: the op runs the reference on the GPU (checked too)
REFERENCE_ON_GPU = {"int3-g128": "no Triton kernel for 3-bit codes", "int2-g64": "no Triton kernel for 2-bit codes"}


def _gpu_families() -> list:
    return [f for f in families() if any(module.startswith(TRITON) for module in f.kernels)]


def _cases() -> list[str]:
    return [name for f in _gpu_families() for name in f.examples]


def _capability_reason(reason: str) -> bool:
    """A row may decline a device that lacks an instruction (fp8 dots, e4m3 conversion) by naming it."""
    return "capability" in reason or "sm_" in reason or "8.9" in reason


def test_every_triton_module_loads_on_this_gpu():
    for record in _gpu_families():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an import or build failure must fail here, not fall back
            record.kernels_loaded = False
            dispatch.load_family_kernels(record.name)
        assert any(row.device_type == "cuda" for row in record.rows), record.name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("scheme_name", _cases())
def test_op_on_gpu_matches_reference(scheme_name, m, dtype):
    scheme = parse_scheme(scheme_name)
    generator = torch.Generator().manual_seed(m)
    packed = scheme.pack(scheme.quantize(torch.randn(N, K, generator=generator))).list()
    x_cpu = torch.randn(m, K, generator=generator).to(dtype)
    bias_cpu = torch.randn(N, generator=generator).to(dtype)
    x, bias = x_cpu.cuda(), bias_cpu.cuda()
    tensors = [t.cuda() for t in packed]
    row, reason = dispatch.select_kernel(scheme, x, tensors)
    if scheme_name in REFERENCE_ON_GPU:
        assert row is None, f"{scheme_name} now has a CUDA row ({row.name}): drop it from REFERENCE_ON_GPU"
    elif row is None:
        assert _capability_reason(reason), f"{scheme_name} M={m}: no CUDA row serves it ({reason})"
        pytest.skip(reason)
    else:
        assert row.device_type == "cuda"
    y = torch.ops.qcompile.linear(x, tensors, bias, scheme_name, K, N)
    assert y.device.type == "cuda" and y.dtype == dtype and y.shape == (m, N)
    ref = reference_linear(x_cpu.float(), packed, bias_cpu.float(), scheme_name, K, N)
    error = ((y.float().cpu() - ref).abs().max() / ref.abs().max()).item()
    # 16-bit outputs and products: a few units of bf16's last place (2**-8) relative to the largest output;
    # activation-quantizing schemes see the same quantized activations (ties aside), so the same bound holds
    served = row.name if row is not None else "the reference"
    assert error < 2e-2, f"{scheme_name} M={m} {dtype} via {served}: relative error {error:.2e}"
    assert torch.isfinite(y).all()
