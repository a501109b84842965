"""SpQR (Dettmers et al. 2023, arXiv:2306.03078): GPTQ whose groups are SpQR's 16 x 16 tiles, with 3-bit
statistics quantized per tile (second order) and unstructured outliers chosen by sensitivity during the sweep.

Inputs: the weight ``W [N, K]`` and ``H = 2/n · Σ x xᵀ`` (``[K, K]``), as for :mod:`qcompile.algorithms.gptq`, whose
inverse Hessian factor and column sweep this reuses (damping, dead columns, lazy block updates). What SpQR changes:

* **order**: with ``act_order`` (default on) columns are visited by decreasing ``H_jj``; the visiting order is the
  layer's ``in_perm`` (column ``j`` of the packed weight is input feature ``perm[j]``), so each 16-column group is
  16 consecutive *visited* columns, as in SpQR's ``permutation_order: act_order``.
* **statistics**: when the sweep reaches the first column of a group, the group's 16 columns of the *updated* weight
  (all ``Np`` rows; padding rows repeat the last row) get min-max 3-bit scales and zeros per row, and those are
  quantized to 3 bits per 16 rows (``qcompile.schemes.spqr.fit_statistics``). With outliers on, the statistics are
  fitted without the likely outliers first, as SpQR's ``get_leave_one_out_error``: a weight whose leave-one-out
  error (min-max 3-bit quantizer of its row's other 15 group weights), divided by ``Hinv_jj``, squared, exceeds the
  threshold is replaced by the mean of the row's other group weights for the fit.
* **outliers**: per column, ``err = (w - q(w)) / Hinv_jj`` with ``q`` the float16 dequantized code; a weight with
  ``err**2 > outlier_threshold * mean_j(var_n(W[:, j]) / Hinv_jj**2)`` (SpQR's ``outlier_scale``, on the permuted
  weight before the sweep) becomes an outlier: its code stays ``q``'s, it stores ``h(w - q(w))`` (float16), and the
  sweep continues with ``q(w) + h(w - q(w))`` as its value (so the error it passes on is float16 rounding only).
  Padding rows and padding columns never hold outliers.

Options: ``damp`` (alias ``percdamp``, default 0.01), ``block_size`` (a multiple of 16, default 128), ``act_order``
(default true), ``outlier_threshold`` (default 0.2, the SpQR README recipe; ``inf`` or ``null``: no outliers).
"""

from __future__ import annotations

import math

import torch

from qcompile.algorithms import Algorithm, register_algorithm
from qcompile.algorithms.gptq import _one_thread, _prepared, _sweep
from qcompile.algorithms.options import check_options
from qcompile.schemes import Scheme
from qcompile.schemes.base import ceil_to
from qcompile.schemes.spqr import (MAX_CODE, TILE, SpqrWeight, code_values, csr, fit_statistics, h, pad_rows,
                                   replace_by_group_mean, round_codes)

DEFAULT_THRESHOLD = 0.2


def _threshold(options: dict) -> float:
    value = options.get("outlier_threshold", DEFAULT_THRESHOLD)
    value = math.inf if value is None else float(value)
    if not value > 0:
        raise ValueError(f"spqr: outlier_threshold must be positive (or inf / null: no outliers), got {value}")
    return value


def leave_one_out_error(span: torch.Tensor, hinv_diag: torch.Tensor) -> torch.Tensor:
    """``((w_i - q_i(w_i)) / Hinv_ii)**2`` for ``span [R, 16]``: ``q_i`` the min-max 3-bit quantizer of the row's
    other 15 weights (float64)."""
    r, g = span.shape
    eye = torch.eye(g, dtype=torch.bool)
    others = span[:, None, :].expand(r, g, g)
    lo = torch.where(eye, torch.inf, others).amin(-1)
    hi = torch.where(eye, -torch.inf, others).amax(-1)
    scale = torch.where(hi > lo, (hi - lo) / MAX_CODE, torch.ones_like(lo))
    zero = -lo / scale
    q = torch.clamp(torch.round(span / scale + zero), 0, MAX_CODE)
    return ((span - (q - zero) * scale) / hinv_diag).square()


def spqr_quantize(scheme: Scheme, weight: torch.Tensor, hessian: torch.Tensor,
                  options: dict | None = None) -> SpqrWeight:  # fmt: skip
    """SpQR of ``weight [N, K]`` given ``hessian [K, K]`` (module docstring) → the scheme's :class:`SpqrWeight`."""
    with _one_thread():
        return _spqr(scheme, weight, hessian, options)


def _spqr(scheme, weight, hessian, options):
    options = check_options("spqr", options)
    damp = float(options.get("damp", options.get("percdamp", 0.01)))
    block_size = int(options.get("block_size", 128))
    if block_size <= 0 or block_size % TILE:
        raise ValueError(f"spqr: block_size must be a positive multiple of {TILE}, got {block_size}")
    act_order = bool(options.get("act_order", True))
    tau = _threshold(options)
    n, k = weight.shape
    scheme.tensors(n, k)  # K within 16-bit columns
    np_, kp = ceil_to(n, TILE), scheme.padded_in_features(k)
    w_t, hinv, perm = _prepared(pad_rows(weight.to(torch.float32), np_), hessian, kp, act_order, damp)
    hinv64 = hinv.to(torch.float64)
    diag = torch.diagonal(hinv64)
    real_row = torch.arange(np_) < n
    real_column = perm < k
    weights = w_t.t()[:n].to(torch.float64)  # the permuted weight (dead columns zeroed), before the sweep
    limit = tau * float((weights.var(dim=0) / diag.square()).mean()) if n > 1 and tau < math.inf else math.inf

    groups = kp // TILE
    scale_codes = torch.zeros(np_, groups, dtype=torch.uint8)
    zero_codes = torch.zeros_like(scale_codes)
    second = torch.zeros(np_ // TILE, groups, 4, dtype=torch.float16)
    codes = torch.zeros(np_, kp, dtype=torch.uint8)
    residual = torch.zeros(np_, kp, dtype=torch.float64)
    outlier = torch.zeros(np_, kp, dtype=torch.bool)
    current = {}

    def refresh(column, block, i, end):  # a group's statistics from the updated weight, at its first column
        if column % TILE:
            return
        g = column // TILE
        span = torch.cat([block[i:], w_t[end:]])[:TILE].t().to(torch.float64)  # [Np, 16]
        if limit < math.inf:
            likely = leave_one_out_error(span, diag[column : column + TILE]) > limit
            likely &= real_row[:, None] & real_column[column : column + TILE][None, :]
            span = replace_by_group_mean(span, likely)
        sc, zc, sec, scale, zero = fit_statistics(span[:, None, :])
        scale_codes[:, g], zero_codes[:, g], second[:, g] = sc[:, 0], zc[:, 0], sec[:, 0]
        current["scale"], current["zero"] = scale[:, 0], zero[:, 0]

    def quantize(column, col):
        values = col.to(torch.float64)
        q = round_codes(values, current["scale"], current["zero"])
        dequantized = code_values(q, current["scale"], current["zero"])
        codes[:, column] = q.to(torch.uint8)
        if limit < math.inf and bool(real_column[column]):
            chosen = (((values - dequantized) / diag[column]).square() > limit) & real_row
            if bool(chosen.any()):
                rest = h(values - dequantized)
                outlier[:, column] = chosen
                residual[:, column] = torch.where(chosen, rest, 0.0)
                dequantized = torch.where(chosen, dequantized + rest, dequantized)
        return dequantized.to(torch.float32)

    _sweep(w_t, hinv, block_size, quantize, refresh)
    offsets, columns, values = csr(outlier, residual, n)
    return SpqrWeight(codes, scale_codes, zero_codes, second, offsets, columns, values, perm.to(torch.int64), k, n)


def _run(scheme: Scheme, weight: torch.Tensor, stats, options: dict) -> SpqrWeight:
    if stats is None or stats.hessian is None:
        raise ValueError(f"site {getattr(stats, 'site', '?')}: SpQR needs the input Hessian; the calibration "
                         f"statistics have none")  # fmt: skip
    return spqr_quantize(scheme, weight, stats.hessian, options)


register_algorithm(Algorithm("spqr", _run, needs_calibration=True, wants_hessian=True))
