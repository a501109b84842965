"""The ``vptq`` algorithm on a small layer with correlated inputs: its output error ``||(W - Ŵ) Xᵀ||`` beats the
data-free k-means quantization of the same scheme, which beats int2 round-to-nearest at similar bits; options are
refused by name; too small layers are refused with the numbers; runs are deterministic."""

from __future__ import annotations

import pytest
import torch

from qcompile.algorithms import get_algorithm
from qcompile.algorithms.vptq import vptq_quantize
from qcompile.schemes import parse_scheme

N, K = 64, 128


def _layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) / K**0.5 + torch.eye(K) * torch.linspace(0.2, 3.0, K)
    x = torch.randn(512, K, generator=g) @ mix  # correlated, uneven channels
    w = torch.randn(N, K, generator=g) * 0.05
    return w, x, 2 * x.t() @ x / x.shape[0]


def _error(w, w_hat, x):
    return float(((w - w_hat) @ x.t()).norm() / (w @ x.t()).norm())


def test_vptq_beats_data_free_kmeans_which_beats_int2_rtn():
    w, x, h = _layer()
    scheme = parse_scheme("vptq-v2-k16")
    calibrated = _error(w, scheme.dequantize(vptq_quantize(scheme, w, h)), x)
    data_free = _error(w, scheme.dequantize(scheme.quantize(w)), x)
    int2 = parse_scheme("int2-g64")
    rtn = _error(w, int2.dequantize(int2.quantize(w)), x)
    assert scheme.bits_per_weight(N, K) <= int2.bits_per_weight(N, K)  # 2.81 (2 bits of index, codebook, norms) vs 3.0
    assert calibrated < 0.9 * data_free < 0.9 * rtn, (calibrated, data_free, rtn)


def test_residual_and_outliers_run_and_pack():
    w, x, h = _layer(1)
    scheme = parse_scheme("vptq-v4-k64-r16-o8")
    q = vptq_quantize(scheme, w, h, {"refit_steps": 3})
    w_hat = scheme.dequantize_packed(scheme.pack(q).list(), N, K)
    assert torch.equal(w_hat, scheme.dequantize(q))
    assert _error(w, w_hat, x) < _error(w, scheme.dequantize(scheme.quantize(w)), x)


def test_deterministic():
    w, _, h = _layer(2)
    scheme = parse_scheme("vptq-v8-k64-r16")
    a, b = (scheme.pack(vptq_quantize(scheme, w, h, {"seed": 3})).list() for _ in range(2))
    assert all(torch.equal(s, t) for s, t in zip(a, b))


def test_options_and_sizes_are_refused_by_name():
    w, _, h = _layer()
    scheme = parse_scheme("vptq-v8-k256")
    with pytest.raises(ValueError, match=r"vptq: unknown option 'refit_step'.*Did you mean 'refit_steps'"):
        vptq_quantize(scheme, w, h, {"refit_step": 2})
    with pytest.raises(ValueError, match=r"vptq: option refit_steps must be >= 0, got -1"):
        vptq_quantize(scheme, w, h, {"refit_steps": -1})
    big = parse_scheme("vptq-v8-k4096")
    with pytest.raises(ValueError, match=r"site blk\.0: vptq-v8-k4096 on \[N=64, K=128\] has 1024 vectors of 8 for "
                                         r"4096 centroids \(at least 4 x 4096 = 16384 wanted\)"):  # fmt: skip
        vptq_quantize(big, w, h, site="blk.0")
    with pytest.raises(ValueError, match=r"the Hessian is \[4, 4\], expected \[128, 128\]"):
        vptq_quantize(scheme, w, torch.eye(4))
    with pytest.raises(ValueError, match=r"writes vptq schemes, not int4"):
        vptq_quantize(parse_scheme("int4"), w, h)
    assert get_algorithm("vptq").wants_hessian


def test_calibrated_mlp_beats_data_free_quantization():
    """Through ``qcompile.quantize``: the calibration pass collects the Hessian the algorithm needs."""
    import copy

    import qcompile

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    mixing = torch.randn(64, 64) / 8 + torch.diag(torch.linspace(0.1, 2.0, 64))
    data = [torch.randn(32, 64) @ mixing for _ in range(4)]
    recipe = {"default": "vptq-v2-k16", "algorithm": "vptq"}
    model = qcompile.quantize(copy.deepcopy(mlp), recipe, calibration=data, progress_bar=False)
    rtn = qcompile.quantize(copy.deepcopy(mlp), "vptq-v2-k16", progress_bar=False)
    x = torch.cat(data)
    with torch.no_grad():
        reference = mlp(x)
        assert float((model(x) - reference).pow(2).mean()) < float((rtn(x) - reference).pow(2).mean())
