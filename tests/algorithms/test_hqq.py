"""HQQ: reconstruction error never increases over its iterations and ends below round to nearest."""

import pytest
import torch

from qcompile.algorithms.hqq import hqq_optimize, hqq_quantize
from qcompile.schemes import parse_scheme


def _weight(seed=0, n=64, k=200):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[torch.rand(n, k, generator=g) < 0.01] *= 8  # heavy tails, as in trained weights
    return w


#: the largest HQQ / round-to-nearest ratio of mean |error| accepted. Measured on ``_weight()``: 0.72-0.97; per
#: channel (one 200-wide group a row) with the zero alone HQQ gains only 1.9 % (0.981, 20 to 100 iterations alike:
#: moving the zero cannot do more there), so that one case is held to 0.985 and optimize_scale to 0.98.
MARGIN = 0.98
MARGIN_ZERO_ONLY_PER_CHANNEL = 0.985


@pytest.mark.parametrize("name", ["int4-g64", "int4-g128", "int3-g64", "int2-g32", "int4", "int4-g32-sym"])
@pytest.mark.parametrize("optimize_scale", [False, True])
def test_error_never_increases(name, optimize_scale):
    scheme = parse_scheme(name)
    weight = _weight()
    scales, zeros, errors = hqq_optimize(scheme, weight, {"optimize_scale": optimize_scale})
    assert len(errors) == 21
    assert all(b <= a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]
    q = hqq_quantize(scheme, weight, {"optimize_scale": optimize_scale})
    assert (q.zeros is None) == scheme.symmetric
    # the error recomputed here in float64 from the weight, not taken from the solver's own report
    achieved = float((scheme.dequantize(q).double() - weight.double()).abs().mean())
    rtn = float((scheme.dequantize(scheme.quantize(weight)).double() - weight.double()).abs().mean())
    per_channel_zero_only = scheme.group_size is None and not optimize_scale and not scheme.symmetric
    margin = MARGIN_ZERO_ONLY_PER_CHANNEL if per_channel_zero_only else MARGIN
    assert achieved <= margin * rtn, (name, optimize_scale, achieved / rtn)


def test_fixed_input_gives_identical_packed_weights():
    scheme = parse_scheme("int4-g64")
    first = scheme.pack(hqq_quantize(scheme, _weight(seed=3)))
    second = scheme.pack(hqq_quantize(scheme, _weight(seed=3)))
    for key, tensor in first.tensors().items():
        assert torch.equal(tensor, second.tensors()[key]), key


def test_padding_columns_do_not_pull_the_zero_point():
    """K=200 with groups of 128: the padded last group fits only its 72 real elements."""
    scheme = parse_scheme("int4-g128")
    weight = _weight(seed=4) + 0.05  # shifted: a zero-padding column would be an outlier
    q = hqq_quantize(scheme, weight)
    assert float((scheme.dequantize(q) - weight).abs().mean()) < float(
        (scheme.dequantize(scheme.quantize(weight)) - weight).abs().mean()
    )
