"""EETQ's int8 weight-only quantization, written out in float64 from its source, against ``eetq-int8``.

EETQ has no CPU build (its kernels are CUDA), so its formula is typed in here from
``csrc/cutlass_kernels/cutlass_preprocessors.cc`` (``symmetric_quantize<half, half>``, which EETQ's
``quant_weights(weight.t(), torch.int8, False)`` calls on a float16 weight), per output channel::

    per_col_max = max |float(w)|;  per_col_max *= 1 / (1 << 7)        scale stored as half(per_col_max)
    q = int8(max(-128, min(127, round(float(w) / per_col_max))))      round: C round, half away from zero

and its GEMM dequantizes ``q * scale`` in float16. The float64 version below computes each float32 operation exactly
and rounds it to float32 (``f32``), as the C++ code does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qcompile.schemes import parse_scheme


def f32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).astype(np.float32).astype(np.float64)


def eetq_quantize(weight_fp16: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(codes int64 [N, K], scales float64 [N])``: the float16 scales EETQ stores, as float64."""
    w = weight_fp16.astype(np.float64)  # float(half) is exact
    per_col_max = np.abs(w).max(axis=1) * (1.0 / 128)  # a power of two: exact in float32
    quotient = f32(w / per_col_max[:, None])
    rounded = np.sign(quotient) * np.floor(np.abs(quotient) + 0.5)  # C round(): half away from zero
    codes = np.clip(rounded, -128, 127).astype(np.int64)
    return codes, per_col_max.astype(np.float16).astype(np.float64)


def _weight(n=23, k=100, seed=0) -> torch.Tensor:
    """Random rows; row 0 with absmax 1 (codes of 1 and -1) and exact ties; row 1 tiny (absmax < 2**-7: its
    scale is a float16 subnormal, rounded)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    w[0] = w[0].clamp(-0.9, 0.9)
    w[0, :6] = torch.tensor([1.0, -1.0, 0.5 / 128, -1.5 / 128, 2.5 / 128, 0.3])
    w[1] = w[1] * 1e-4
    w[1, 0] = (1 + 2**-10) * 2**-8  # absmax / 128 = 2**-15 + 2**-25: between float16 subnormals
    return w.to(torch.float16)


def test_codes_and_scales_are_eetqs():
    w = _weight()
    codes, scales = eetq_quantize(w.numpy())
    q = parse_scheme("eetq-int8").quantize(w.float())
    assert np.array_equal(q.codes.numpy().astype(np.int64), codes)
    assert np.array_equal(q.scales.numpy()[:, 0].astype(np.float64), scales)
    # row 0: absmax 1 maps to +-128, +128 clipped to 127; ties 0.5, -1.5, 2.5 go away from zero
    assert codes[0, :5].tolist() == [127, -128, 1, -2, 3]


def test_dequantized_in_float16_is_q_times_half_scale():
    w = _weight(seed=1)
    codes, scales = eetq_quantize(w.numpy())
    scheme = parse_scheme("eetq-int8")
    q = scheme.unpack(scheme.pack(scheme.quantize(w.float())), w.shape[1])
    expected = (codes * scales[:, None]).astype(np.float16)  # one rounding of the exact product, as fp16 hardware
    assert np.array_equal(scheme.dequantize_as(q, torch.float16).numpy(), expected)


def test_where_eetq_differs_from_int8():
    """qcompile ``int8``: float32 ``absmax / 127``, half to even, codes in [-127, 127]. EETQ: ``absmax / 128`` (the
    row maximum clipped from 128 to 127), ties away from zero, float16 scales. Dividing a float16 absmax by 128 is
    exact while the result stays a normal float16 (absmax >= 2**-7), so the stored scale is then exactly the one the
    codes were computed with; a smaller row's scale is a float16 subnormal, rounded after the codes were made."""
    w = _weight(seed=2)
    eetq = parse_scheme("eetq-int8").quantize(w.float())
    int8 = parse_scheme("int8").quantize(w.float())
    absmax = w.float().abs().amax(1, keepdim=True)
    assert torch.equal(int8.scales, absmax / 127)
    assert torch.equal(eetq.scales, (absmax / 128).half().float())
    assert not torch.equal(eetq.codes, int8.codes)
    exact = absmax / 128
    normal = absmax[:, 0] >= 2**-7
    assert torch.equal(eetq.scales[normal], exact[normal])
    assert not normal[1] and eetq.scales[1] != exact[1]
    assert (eetq.scales[1] - exact[1]).abs() <= 2**-25  # half a float16 subnormal step


@pytest.mark.parametrize("m", [1, 5])
def test_op_runs_eetq_weights(m):
    """The op (the ``int8`` C++ kernel on the same layout) against float64 ``x @ (q * scale).T``."""
    w = _weight(seed=3)
    codes, scales = eetq_quantize(w.numpy())
    scheme = parse_scheme("eetq-int8")
    packed = scheme.pack(scheme.quantize(w.float())).list()
    x = torch.randn(m, w.shape[1], generator=torch.Generator().manual_seed(4))
    y = torch.ops.qcompile.linear(x, packed, None, "eetq-int8", w.shape[1], w.shape[0])
    expected = x.double().numpy() @ (codes * scales[:, None]).T
    assert np.abs(y.double().numpy() - expected).max() <= 1e-5 * np.abs(expected).max()
