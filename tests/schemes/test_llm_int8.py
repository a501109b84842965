"""``llm-int8`` against bitsandbytes on CPU: the weight codes equal ``int8_vectorwise_quant`` (CB, SCB) byte for byte,
and the reference matmul matches ``Linear8bitLt`` (``has_fp16_weights=False``, eval) on inputs with outlier columns,
float32 / bfloat16 / float16, one and several tokens; the float64 definition; names and refused thresholds.

Tolerances against bitsandbytes, ``max|ours - theirs| <= tol * max|theirs|``: float32 4e-5 (its CPU backend
multiplies the int32 sums by 6.200124e-05 where 1/127**2 is 6.2000124e-05, 1.8e-5 relative; measured at most
1.3e-5 of max|y|); bfloat16 / float16 8e-3 (it rounds the int8 part and the outlier product to the activation dtype
separately, two steps of 2**-8 at most; measured 3.5e-3). A wrong outlier rule (the columns quantized with the rest,
or every column in float) moves outputs by over 1e-3 of max|y|: checked on the same inputs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import definitions
from qcompile.schemes import SchemeError, parse_scheme
from qcompile.schemes.llm_int8 import LLMInt8

TOLERANCE = {torch.float32: 4e-5, torch.bfloat16: 8e-3, torch.float16: 8e-3}


def _linear(n, k, seed):
    torch.manual_seed(seed)
    return torch.nn.Linear(k, n)


def _inputs(m, k, dtype, seed):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x[:, 3] *= 10  # an outlier column (most tokens over 6)
    x[0, 7] = 8.0  # an outlier element in the first token only: its column goes to float for every token
    x[-1, 9] = -6.5
    x[-1, 11] = 5.99  # below the threshold: quantized
    return x.to(dtype)


def _bnb_module(linear, threshold):
    import bitsandbytes as bnb

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=True, has_fp16_weights=False,
                                 threshold=threshold)  # fmt: skip
    module.load_state_dict(linear.state_dict())
    return module.to("cpu").eval()


def test_names_and_thresholds():
    assert parse_scheme("llm-int8") == LLMInt8(6.0) and LLMInt8(6.0).name == "llm-int8"
    for name, threshold in [("llm-int8-t4.5", 4.5), ("llm-int8-t3", 3.0), ("llm-int8-t0.25", 0.25)]:
        scheme = parse_scheme(name)
        assert scheme.family == "llm-int8" and scheme.threshold == threshold and scheme.name == name
    assert parse_scheme("llm-int8-t6").name == "llm-int8"
    for bad, words in [("llm-int8-t0", "finite number > 0, got 0.0"), ("llm-int8-t-2", "> 0, got -2.0"),
                       ("llm-int8-tinf", "finite number > 0, got inf"), ("llm-int8-tnan", "got nan"),
                       ("llm-int8-tsix", "threshold 'six' in 'llm-int8-tsix' is not a number")]:  # fmt: skip
        with pytest.raises(SchemeError, match=rf"scheme '{bad}': llm-int8: .*{words}"):
            parse_scheme(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weight_codes_equal_bitsandbytes(dtype):
    import bitsandbytes.functional as functional

    w = (torch.randn(33, 70, generator=torch.Generator().manual_seed(1)) * 0.1).to(dtype)
    theirs, scb, _ = functional.int8_vectorwise_quant(w.to(torch.float16))
    packed = LLMInt8().pack(LLMInt8().quantize(w))
    assert torch.equal(packed["qweight"], theirs) and torch.equal(packed["scales"], scb)
    dequantized = LLMInt8().dequantize_packed(packed, 33, 70)
    assert torch.equal(dequantized, functional.int8_vectorwise_dequant(theirs, scb))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, n, k, threshold", [(5, 33, 70, 6.0), (1, 48, 256, 6.0), (9, 40, 96, 4.5)])
def test_reference_matches_linear8bitlt(m, n, k, threshold, dtype):
    linear = _linear(n, k, seed=m)
    module = _bnb_module(linear, threshold)
    scheme = LLMInt8(threshold)
    packed = scheme.pack(scheme.quantize(linear.weight.detach())).list()
    assert torch.equal(packed[0], module.state.CB if module.state.CB is not None else module.weight.CB)
    x = _inputs(m, k, dtype, seed=k).reshape(1, m, k)
    bias = linear.bias.detach().to(dtype)
    with torch.no_grad():
        theirs = module(x)
        ours = scheme.reference_linear(x, packed, bias, n)
        assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape == (1, m, n)
        worst = ((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max()).item()
        assert worst <= TOLERANCE[dtype], f"max |ours - bitsandbytes| = {worst:.3g} of max|y|"
        if dtype == torch.float32:  # the same inputs with a wrong outlier rule are far off
            for wrong in (LLMInt8(1000.0), LLMInt8(0.01)):
                off = (wrong.reference_linear(x, packed, bias, n) - theirs).abs().max() / theirs.abs().max()
                assert off > 1e-3, f"{wrong.name} is within {off:.3g} of bitsandbytes"


def test_reference_matches_the_definition_with_outliers():
    n, k = 37, 90
    scheme = parse_scheme("llm-int8-t4.5")
    packed = scheme.pack(scheme.quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(7)))).list()
    x = _inputs(6, k, torch.float32, seed=8)
    x[2] = 0.0  # no scale: the int8 part is 0
    x[4, :] = torch.where(x[4].abs() >= 4.5, x[4], torch.zeros(()))  # only outliers
    bias = torch.randn(n, generator=torch.Generator().manual_seed(9))
    expected, slack = definitions.linear(scheme, x, packed, bias, n)
    got = scheme.reference_linear(x, packed, bias, n).double().numpy()
    assert (np.abs(got - expected) <= 1e-5 * np.abs(expected).max() + slack).all()
    np.testing.assert_allclose(got[2], bias.double().numpy(), rtol=0, atol=1e-6)
