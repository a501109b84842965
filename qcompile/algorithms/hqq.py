"""HQQ, half-quadratic quantization (Badri & Shaji, 2023): better zero points (and optionally scales)
without calibration data.

Per group, with codes ``u = clamp(round(W / s + z))`` and reconstruction ``W_r = (u - z) · s``, HQQ
minimises ``‖W − W_r‖_p^p`` (``p = 0.7``, heavy-tailed errors) by splitting it with an auxiliary error
``W_e`` and alternating two closed-form steps (the proximal solver of the hqq paper)::

    W_e ← shrink_p(W − W_r, β)           shrink_p(x, β) = sign(x) · relu(|x| − |x|^(p−1) / β)
    z   ← mean(u − (W − W_e) / s)        over the group's real (not padding) elements
    s   ← Σ (W − W_e)(u − z) / Σ (u − z)²   only with ``optimize_scale``
    β   ← κ · β                          β₀ = 10, κ = 1.01

Start: the round-to-nearest scales and float zeros of the scheme. Each group keeps the iterate with the
lowest mean absolute reconstruction error seen so far, so the error never rises above round-to-nearest
and never increases from one iteration to the next. Symmetric schemes have no zero to fit; they get
the scale step. Output: the canonical float-zero form of :mod:`qcompile.schemes.integer`.

Options: ``iterations`` (20), ``lp_norm`` (0.7), ``beta`` (10), ``kappa`` (1.01), ``optimize_scale`` (false).
"""

from __future__ import annotations

import torch

from qcompile.algorithms import Algorithm, register_algorithm
from qcompile.algorithms.grid import code_range, integer_scheme, offsets
from qcompile.algorithms.options import check_options
from qcompile.schemes import QuantizedWeight, Scheme


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft threshold, the proximal operator of ``|x|^p / beta``."""
    return torch.sign(x) * torch.relu(x.abs() - x.abs().clamp_min(1e-12).pow(p - 1) / beta)


def _group_error(w, s, z, lo, hi, mask, count):
    u = torch.clamp(torch.round(w / s + z), lo, hi)
    return (((u - z) * s - w).abs() * mask).sum(-1) / count  # [N, groups]


def hqq_optimize(scheme: Scheme, weight: torch.Tensor, options: dict | None = None):
    """``(scales, zeros, errors)``: fitted ``[N, groups]`` parameters (``zeros`` ``None`` when symmetric)
    and the mean absolute reconstruction error after each iteration (``errors[0]``: round to nearest)."""
    options = check_options("hqq", options)
    grid = integer_scheme(scheme, "hqq")
    iterations = int(options.get("iterations", 20))
    p = float(options.get("lp_norm", 0.7))
    beta = float(options.get("beta", 10.0))
    kappa = float(options.get("kappa", 1.01))
    fit_scale = bool(options.get("optimize_scale", False)) or grid.symmetric
    lo, hi = code_range(grid)

    n, k = weight.shape
    w = grid._grouped(weight)  # [N, groups, group_size], zero padded
    group = w.shape[-1]
    mask = (torch.arange(w.shape[1] * group).reshape(w.shape[1], group) < k).to(w.dtype)  # real elements
    count = mask.sum(-1)
    scales, zeros = grid.compute_scales(weight)
    s, z = scales.unsqueeze(-1).clone(), offsets(grid, zeros, scales).unsqueeze(-1).clone()
    best_s, best_z = s.clone(), z.clone()
    best = _group_error(w, s, z, lo, hi, mask, count)
    errors = [float(best.sum() / n / w.shape[1])]
    for _ in range(iterations):
        u = torch.clamp(torch.round(w / s + z), lo, hi)
        w_e = shrink_lp(w - (u - z) * s, beta, p)
        target = w - w_e
        if not grid.symmetric:
            z = ((u - target / s) * mask).sum(-1, keepdim=True) / count.unsqueeze(-1)
        if fit_scale:
            centred = (u - z) * mask
            denominator = (centred * centred).sum(-1, keepdim=True)
            fitted = (target * centred).sum(-1, keepdim=True) / denominator.clamp_min(1e-12)
            s = torch.where((denominator > 0) & (fitted > 0), fitted, s)
        beta *= kappa
        current = _group_error(w, s, z, lo, hi, mask, count)
        better = current < best
        best = torch.where(better, current, best)
        best_s = torch.where(better.unsqueeze(-1), s, best_s)
        best_z = torch.where(better.unsqueeze(-1), z, best_z)
        errors.append(float(best.sum() / n / w.shape[1]))
    return best_s.squeeze(-1), None if grid.symmetric else best_z.squeeze(-1), errors


def hqq_quantize(scheme: Scheme, weight: torch.Tensor, options: dict | None = None) -> QuantizedWeight:
    grid = integer_scheme(scheme, "hqq")
    scales, zeros, _ = hqq_optimize(grid, weight.to(torch.float32), options)
    return grid.quantize_with(weight, scales, zeros)


def _run(scheme: Scheme, weight: torch.Tensor, stats=None, options: dict | None = None) -> QuantizedWeight:
    return hqq_quantize(scheme, weight, options)


register_algorithm(Algorithm("hqq", _run, needs_calibration=False))
