"""W4A8: int4 weights of ``int4-gN`` × per-token int8 activations, against integer math written out here."""

from __future__ import annotations

import pytest
import torch

from qcompile.schemes import IntWeightOnly, W4A8Int, parse_scheme


@pytest.mark.parametrize("name, group, symmetric", [("w4a8-g128", 128, False), ("w4a8-g32-sym", 32, True),
                                                    ("w4a8", None, False)])  # fmt: skip
def test_names_round_trip_and_weights_are_int4(name, group, symmetric):
    scheme = parse_scheme(name)
    assert scheme == W4A8Int(group_size=group, symmetric=symmetric) and scheme.name == name
    assert scheme.weights == IntWeightOnly(bits=4, group_size=group, symmetric=symmetric)
    weight = torch.randn(6, 64)
    packed, same = scheme.pack(scheme.quantize(weight)), scheme.weights.pack(scheme.weights.quantize(weight))
    assert torch.equal(packed.qweight, same.qweight) and torch.equal(packed.scales, same.scales)


@pytest.mark.parametrize("name, k", [("w4a8-g32", 96), ("w4a8-g32-sym", 70), ("w4a8-g64", 64)])
def test_reference_is_integer_dot_products_per_group(name, k):
    torch.manual_seed(0)
    scheme = parse_scheme(name)
    n, m, group = 5, 3, scheme.group_size
    packed = scheme.pack(scheme.quantize(torch.randn(n, k)))
    x = torch.randn(m, k) * 4
    bias = torch.randn(n)
    got = scheme.reference_linear(x, packed.list(), bias, n)

    codes = scheme.unpack(packed, k).codes.long()
    zeros = packed.zeros if packed.get("zeros") is not None else torch.full_like(packed.scales, 8.0)
    expected = torch.empty(m, n, dtype=torch.float64)
    for i in range(m):
        scale = x[i].abs().max() / 127  # float32, as the activation is quantized
        xq = [max(-127, min(127, round(v))) for v in (x[i] / scale).tolist()]  # round half to even
        scale = scale.item()
        xq = xq + [0] * (codes.shape[1] - k)
        for j in range(n):
            total = 0.0
            for g in range(codes.shape[1] // group):
                part = range(g * group, (g + 1) * group)
                dot = sum(int(codes[j, t]) * xq[t] for t in part)  # exact Python integers
                total += packed.scales[j, g].item() * (dot - zeros[j, g].item() * sum(xq[t] for t in part))
            expected[i, j] = total * scale + bias[j].item()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_close_to_the_float_linear_it_approximates():
    torch.manual_seed(1)
    scheme = parse_scheme("w4a8-g32")
    weight, x = torch.randn(64, 256), torch.randn(8, 256)
    packed = scheme.pack(scheme.quantize(weight))
    got = scheme.reference_linear(x, packed.list(), None, 64)
    w4a16 = x @ scheme.dequantize_packed(packed, 64, 256).t()
    assert (got - w4a16).norm() / w4a16.norm() < 0.02  # the activation rounding only
