"""Quantizers of the gguf schemes: llama.cpp's reference rules.

* legacy types (q4_0 … q8_0): bytes identical to the peer's quantizer (gguf-py ``gguf.quants.quantize``, bit-exact to
  ggml's ``quantize_row_*_ref``), ragged K and zero blocks included;
* every type: llama.cpp's own error bounds from ``tests/test-quantize-fns.cpp`` (data ``0.1 + 2 cos(i)``, 4096 values,
  ``sqrt(Σ diff²) / n`` below 0.002; 0.0075 for Q2_K, 0.004 for Q3_K), and relative RMS errors on Gaussian weights;
* k-quants / IQ4: properties the reference rules imply (the largest sub-block scale takes the top code, the zero block
  of IQ4_XS is the bytes the C code writes), decoded by the peer;
* GPTQ writes q4_0, q8_0, q4_k (and every type) with the round-to-nearest scales kept and a lower output error.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from qcompile.schemes import parse_scheme
from qcompile.schemes.gguf_blocks import BLOCK_TYPES

TYPES = list(BLOCK_TYPES)
LEGACY = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
#: observed relative RMS error on N(0, 0.05²) weights [64, 512] (seed 0), with 10% headroom
GAUSSIAN_RMS = {"q4_0": 0.0857, "q4_1": 0.0783, "q5_0": 0.0425, "q5_1": 0.0379, "q8_0": 0.0053, "q2_k": 0.298,
                "q3_k": 0.1506, "q4_k": 0.0715, "q5_k": 0.0360, "q6_k": 0.0176, "iq4_nl": 0.0759, "iq4_xs": 0.0765}
#: llama.cpp tests/test-quantize-fns.cpp MAX_QUANTIZATION_TOTAL_ERROR(_2BITS, _3BITS)
LLAMA_CPP_BOUND = {"q2_k": 0.0075, "q3_k": 0.0040}


def _blocks(scheme, weight):
    return scheme.pack(scheme.quantize(weight))["blocks"]


def _peer_dequantize(qtype, blocks, k):
    values = quants.dequantize(blocks.numpy(), GGMLQuantizationType[qtype.upper()])
    return torch.from_numpy(values)[:, :k]


@pytest.mark.parametrize("qtype", LEGACY)
def test_legacy_bytes_equal_the_peer_quantizer(qtype):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 200, generator=g) * 0.03  # K = 200: the last block is padded with zeros
    weight[3] = 0.0
    weight[4, :32] = torch.arange(32) / 8.0 - 2.0  # values on exact multiples of the scale: rounding ties
    weight[5, :32] = -weight[4, :32]
    padded = torch.nn.functional.pad(weight, (0, 24))
    expected = quants.quantize(padded.numpy(), GGMLQuantizationType[qtype.upper()])
    assert np.array_equal(_blocks(parse_scheme(qtype), weight).numpy(), expected)


def test_cosine_data_within_llama_cpp_bounds():
    x = (0.1 + 2 * torch.cos(torch.arange(4096, dtype=torch.float64))).to(torch.float32).reshape(1, -1)
    errors = {}
    for qtype in TYPES:
        scheme = parse_scheme(qtype)
        y = _peer_dequantize(qtype, _blocks(scheme, x), 4096)
        errors[qtype] = math.sqrt(((y.double() - x.double()) ** 2).sum()) / 4096
    over = {t: e for t, e in errors.items() if not e < LLAMA_CPP_BOUND.get(t, 0.002)}
    assert not over, f"over llama.cpp's bounds: {over} (all: {errors})"


def test_gaussian_errors():
    weight = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 0.05
    errors = {}
    for qtype in TYPES:
        y = _peer_dequantize(qtype, _blocks(parse_scheme(qtype), weight), 512)
        errors[qtype] = float(((y - weight).pow(2).mean() / weight.pow(2).mean()).sqrt())
    over = {t: e for t, e in errors.items() if not e <= GAUSSIAN_RMS[t] * 1.1}
    assert not over, f"errors above the recorded ones: {over}"
    # more bits, less error; the k-quants and IQ4 beat the legacy types of the same size
    assert errors["q2_k"] > errors["q3_k"] > errors["q4_k"] > errors["q5_k"] > errors["q6_k"] > errors["q8_0"]
    assert errors["q4_k"] < errors["q4_0"] and errors["iq4_nl"] < errors["q4_0"] and errors["q5_k"] < errors["q5_0"]


@pytest.mark.parametrize("qtype", TYPES)
def test_round_trip_pack_unpack_and_padding(qtype):
    scheme = parse_scheme(qtype)
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(9, 300, generator=g)
    q = scheme.quantize(weight)
    packed = scheme.pack(q)
    assert torch.equal(scheme.dequantize(scheme.unpack(packed, 300)), scheme.dequantize(q))
    assert torch.equal(scheme.dequantize_packed(packed, 9, 300), scheme.dequantize(q))
    kp = scheme.padded_in_features(300)
    explicit = scheme.pack(scheme.quantize(torch.nn.functional.pad(weight, (0, kp - 300))))
    assert torch.equal(packed["blocks"], explicit["blocks"])  # padding columns are quantized zeros
    zero = scheme.dequantize(scheme.quantize(torch.zeros(3, 256)))
    assert torch.equal(zero, torch.zeros(3, 256)), qtype


def _fields(qtype, weight):
    kind = BLOCK_TYPES[qtype]
    return kind.decode(_blocks(parse_scheme(qtype), weight).reshape(-1, kind.nbytes))


def test_k_quant_scales_follow_the_reference_rules():
    """The largest sub-block scale of a block is coded at the top of its range (``63 / max_scale`` for Q4_K/Q5_K,
    ``-128 / max_scale`` for Q6_K, ``-32 / max_scale`` then ``+ 32`` → 0 for Q3_K, ``15 / max_scale`` for Q2_K)."""
    weight = torch.randn(16, 512, generator=torch.Generator().manual_seed(2))
    assert (_fields("q4_k", weight)["sc"].amax(1) == 63).all()
    assert (_fields("q5_k", weight)["sc"].amax(1) == 63).all()
    assert (_fields("q6_k", weight)["sc"].amin(1) == -128).all()
    assert (_fields("q3_k", weight)["sc"].amin(1) == 0).all()
    assert (_fields("q2_k", weight)["sc"].amax(1) == 15).all()


def test_iq4_zero_blocks_are_the_bytes_of_the_c_code():
    """``quantize_row_iq4_nl_impl`` on zeros: IQ4_XS ``d = -0.0`` (f16 0x8000), every 6-bit scale 32 (``scales_h``
    0xAAAA, ``scales_l`` 0), codes ``best_index(0) = 8``; IQ4_NL (``ntry = 7``) ``d = 0``, codes 8."""
    xs = _blocks(parse_scheme("iq4_xs"), torch.zeros(1, 256))[0]
    assert xs[:8].tolist() == [0x00, 0x80, 0xAA, 0xAA, 0, 0, 0, 0] and (xs[8:] == 0x88).all()
    nl = _blocks(parse_scheme("iq4_nl"), torch.zeros(1, 32))[0]
    assert nl[:2].tolist() == [0, 0] and (nl[2:] == 0x88).all()


def _gptq_case():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 512, generator=g) * 0.05
    x = torch.randn(1024, 512, generator=g) @ (torch.randn(512, 512, generator=g) * 0.05 + torch.eye(512))
    return weight, x, 2 * x.t() @ x / x.shape[0]


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0", "q4_k", "q3_k", "iq4_xs"])
def test_gptq_writes_the_grid_with_rtn_scales(qtype):
    from qcompile.algorithms.gptq import gptq_quantize

    scheme = parse_scheme(qtype)
    weight, x, hessian = _gptq_case()
    rtn, gptq = scheme.quantize(weight), gptq_quantize(scheme, weight, hessian)
    for name, field in rtn.fields.items():
        if name != "q":
            assert torch.equal(field, gptq.fields[name]), f"{qtype}: GPTQ changed {name}"
    assert not torch.equal(rtn.fields["q"], gptq.fields["q"])
    blocks = scheme.pack(gptq)["blocks"]
    decoded = _peer_dequantize(qtype, blocks, 512)

    def error(w):
        return float(((x @ (w - weight).t()) ** 2).mean())

    assert error(decoded) < 0.8 * error(scheme.dequantize(rtn)), qtype


def test_gptq_recipe_and_refused_algorithms():
    """``{"default": "q4_k", "algorithm": "gptq"}`` quantizes a model through the calibration pass; HQQ is refused
    naming the algorithms that can write the family."""
    import qcompile
    from qcompile.models import tiny_llama

    model = tiny_llama(seed=0, layers=1, hidden=256, intermediate=512)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    qcompile.quantize(model, {"default": "q4_k", "algorithm": "gptq"}, calibration=[ids],
                      progress_bar=False)  # fmt: skip
    schemes = {m.scheme for m in model.modules() if isinstance(m, qcompile.nn.QuantizedLinear)}
    assert schemes == {"q4_k"}
    with pytest.raises(ValueError, match=r"algorithm 'hqq' cannot write q4_k \(family gguf\); algorithms for it: "
                                         r"rtn, gptq, awq"):  # fmt: skip
        qcompile.quantize(tiny_llama(seed=0, layers=1), {"default": "q4_k", "algorithm": "hqq"}, progress_bar=False)
