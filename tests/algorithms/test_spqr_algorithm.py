"""The SpQR algorithm on a small layer with correlated inputs: it beats GPTQ at 3 bits in groups of 16 (float
statistics, no outliers), which beats round-to-nearest; its outlier count follows the threshold; its permutation is
act_order's and every outlier sits on a real row and input feature; options are checked by name."""

from __future__ import annotations

import math

import pytest
import torch

from qcompile.algorithms import get_algorithm
from qcompile.algorithms.gptq import gptq_quantize
from qcompile.algorithms.spqr import leave_one_out_error, spqr_quantize
from qcompile.recipe import ALGORITHMS
from qcompile.schemes import parse_scheme
from qcompile.schemes.registry import check_algorithm

SPQR = parse_scheme("spqr-3")
INT3 = parse_scheme("int3-g16")
N, K, TOKENS = 40, 90, 384  # ragged: N and K are no multiples of 16


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(K, K, generator=g) / K**0.5 + torch.eye(K)
    x = (torch.randn(TOKENS, K, generator=g) @ mix) * (torch.rand(K, generator=g) * 3 + 0.2)
    w = torch.randn(N, K, generator=g)
    w[torch.rand(N, K, generator=g) < 0.01] *= 6  # a few large weights
    hessian = 2 / TOKENS * x.double().t() @ x.double()
    return w, x, hessian


def _error(w, x, w_hat) -> float:
    return ((w - w_hat) @ x.t()).norm().item()


@pytest.fixture(scope="module")
def default(layer):
    w, _, hessian = layer
    return spqr_quantize(SPQR, w, hessian)


def test_spqr_beats_gptq_int3_g16_which_beats_rtn(layer, default):
    w, x, hessian = layer
    spqr = _error(w, x, SPQR.dequantize(default))
    gptq = _error(w, x, INT3.dequantize(gptq_quantize(INT3, w, hessian)))
    rtn = _error(w, x, INT3.dequantize(INT3.quantize(w)))
    assert default.nnz > 0
    assert spqr < 0.8 * gptq and gptq < 0.8 * rtn, (spqr, gptq, rtn)
    assert rtn <= _error(w, x, SPQR.dequantize(SPQR.quantize(w)))  # quantized statistics cost a little


def test_outlier_count_follows_the_threshold(layer, default):
    w, x, hessian = layer
    counts = {t: spqr_quantize(SPQR, w, hessian, {"outlier_threshold": t}).nnz for t in (0.05, 1.0, math.inf)}
    assert counts[0.05] > default.nnz > counts[1.0] > counts[math.inf] == 0
    assert spqr_quantize(SPQR, w, hessian, {"outlier_threshold": None}).nnz == 0


def test_layout_permutation_and_outlier_positions(layer, default):
    w, _, hessian = layer
    q = default
    kp = SPQR.padded_in_features(K)
    diag = torch.diag(hessian)
    assert q.perm[:K].tolist() == torch.argsort(torch.cat([diag, torch.zeros(kp - K, dtype=diag.dtype)]),
                                                descending=True, stable=True)[:K].tolist()  # fmt: skip
    assert q.row_offsets.shape == (N + 1,) and int(q.row_offsets[-1]) == q.nnz
    assert bool((q.perm[q.columns] < K).all())
    packed = SPQR.pack(q)  # validates CSR and permutation on the way back
    torch.testing.assert_close(SPQR.dequantize_packed(packed, N, K), SPQR.dequantize(q), rtol=0, atol=0)
    plain = spqr_quantize(SPQR, w, hessian, {"act_order": False, "outlier_threshold": math.inf})
    assert torch.equal(plain.perm, torch.arange(kp))


def test_leave_one_out_error_is_the_quantizer_of_the_other_fifteen():
    span = torch.randn(3, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = leave_one_out_error(span, torch.full((16,), 0.5, dtype=torch.float64))
    for r in range(3):
        for i in range(16):
            others = torch.cat([span[r, :i], span[r, i + 1 :]])
            scale = (others.max() - others.min()) / 7
            zero = -others.min() / scale
            q = torch.clamp(torch.round(span[r, i] / scale + zero), 0, 7)
            assert got[r, i].item() == pytest.approx((((span[r, i] - (q - zero) * scale) / 0.5) ** 2).item())


def test_options_are_refused_by_name(layer):
    w, _, hessian = layer
    with pytest.raises(ValueError, match="unknown option 'outlier_treshold'.*Did you mean 'outlier_threshold'"):
        spqr_quantize(SPQR, w, hessian, {"outlier_treshold": 0.1})
    with pytest.raises(ValueError, match="block_size must be a positive multiple of 16, got 24"):
        spqr_quantize(SPQR, w, hessian, {"block_size": 24})
    with pytest.raises(ValueError, match="outlier_threshold must be positive"):
        spqr_quantize(SPQR, w, hessian, {"outlier_threshold": -1})


def test_registered_for_the_family_and_recipes():
    assert "spqr" in ALGORITHMS and get_algorithm("spqr").needs_calibration
    check_algorithm(SPQR, "spqr")
    with pytest.raises(ValueError, match="algorithm 'gptq' cannot write spqr-3"):
        check_algorithm(SPQR, "gptq")
    with pytest.raises(ValueError, match="SpQR needs the input Hessian"):
        get_algorithm("spqr").run(SPQR, torch.zeros(16, 16), None, {})
