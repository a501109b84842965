"""GPTQ (Frantar et al., 2022): quantize a weight column by column, spreading each column's rounding
error over the columns not yet quantized through the inverse Hessian of the layer's inputs.

Inputs: the weight ``W [N, K]`` and ``H = 2/n · Σ x xᵀ`` (``[K, K]``, from :mod:`qcompile.algorithms.calibrate`).

* damping: ``H += damp · mean(diag H) · I`` (option ``damp``, alias ``percdamp``, default 0.01);
  input channels that never saw a non-zero activation ("dead") get ``H_jj = 1`` and ``W_:j = 0``.
* ``Hinv`` is the upper Cholesky factor of ``H⁻¹``; columns are processed in blocks of ``block_size``
  (default 128) with the error of a whole block applied lazily to the columns after it.
* groups: scales/zeros per group of the scheme. With ``act_order`` (default on) columns are visited in
  order of decreasing ``H_jj``, and groups are **static**: their scales/zeros are computed by
  round-to-nearest on the original weight, in the original column order, before any update. The result
  is therefore the plain canonical form (no ``g_idx``, no permutation at run time). Without
  ``act_order``, groups may be dynamic (``static_groups: false``, the default then): each group's scales
  are computed from the updated weight when GPTQ reaches its first column, as in the reference code.

Schemes that are no integer grid but offer a column grid (:func:`qcompile.algorithms.grid.column_grid`, e.g. the
GGUF block types) keep the scales of round-to-nearest (static) and GPTQ chooses the codes column by column.

Options: ``damp``, ``block_size``, ``act_order``, ``static_groups``.
"""

from __future__ import annotations

import contextlib

import torch

from qcompile.algorithms import Algorithm, register_algorithm
from qcompile.algorithms.grid import code_range, column_grid, integer_scheme, offsets
from qcompile.algorithms.options import check_options
from qcompile.schemes import QuantizedWeight, Scheme
from qcompile.schemes.base import pad_columns

def _inverse_hessian_factor(hessian: torch.Tensor, weight: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹``, factorised in float64, returned float32.

    Zeroes the dead columns of ``weight`` in place."""
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    weight[:, dead] = 0
    diag = torch.arange(h.shape[0])
    h[diag, diag] += damp * torch.mean(torch.diag(h))
    for attempt in range(6):  # near-singular H: raise the damping until the factorisation succeeds
        factor, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            break
        h[diag, diag] += damp * torch.mean(torch.diag(h)) * 10**attempt
    else:
        raise ValueError("GPTQ: the Hessian stays singular after damping; pass more calibration data")
    factor_inverse = torch.linalg.solve_triangular(factor, torch.eye(h.shape[0], dtype=h.dtype), upper=False)
    inverse = factor_inverse.t() @ factor_inverse  # H⁻¹ = L⁻ᵀ L⁻¹ (faster than cholesky_inverse here)
    return torch.linalg.cholesky(inverse, upper=True).to(torch.float32)


@contextlib.contextmanager
def _one_thread():
    """The column loop is thousands of tiny ops: one intra-op thread is ~10x faster than two on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gptq_quantize(scheme: Scheme, weight: torch.Tensor, hessian: torch.Tensor, options: dict | None = None):
    """GPTQ of ``weight [N, K]`` given ``hessian [K, K]``; returns the scheme's :class:`QuantizedWeight`."""
    with _one_thread():
        return _gptq(scheme, weight, hessian, options)


def _sweep(w_t: torch.Tensor, hinv: torch.Tensor, block_size: int, quantize, before_column=None) -> torch.Tensor:
    """The column sweep over ``w_t [Kp, N]`` (a weight column per row, in visiting order, updated in place):
    ``quantize(column, values [N]) -> [N]`` rounds one column; ``before_column(column, block, i, end)`` may refresh
    grid parameters first (dynamic groups). Returns the rounded ``[Kp, N]``."""
    kp, n = w_t.shape
    q_t = torch.zeros(kp, n)
    for start in range(0, kp, block_size):
        end = min(start + block_size, kp)
        block, err_block, hinv_block = w_t[start:end].clone(), torch.zeros(end - start, n), hinv[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if before_column is not None:
                before_column(column, block, i, end)
            col = block[i]
            q_col = quantize(column, col)
            q_t[column] = q_col
            err = (col - q_col).div_(hinv_block[i, i])
            block[i:].addr_(hinv_block[i, i:], err, alpha=-1)
            err_block[i] = err
        w_t[end:].addmm_(hinv[start:end, end:].t(), err_block, alpha=-1)
    return q_t


def _prepared(weight, hessian, kp, act_order, damp):
    """``(w_t [Kp, N], hinv, perm)``: padded weight and Hessian in visiting order, the inverse Hessian factor."""
    k = weight.shape[1]
    w = pad_columns(weight.to(torch.float32), kp).clone()
    h = torch.zeros(kp, kp, dtype=torch.float64)
    h[:k, :k] = hessian.to(torch.float64)
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(kp)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_hessian_factor(h, w, damp)
    return w.t().contiguous(), hinv, perm  # work on Wᵀ: a weight column is a contiguous row


def _gptq(scheme, weight, hessian, options):
    options = check_options("gptq", options)
    damp = float(options.get("damp", options.get("percdamp", 0.01)))
    block_size = int(options.get("block_size", 128))
    act_order = bool(options.get("act_order", True))
    columns = column_grid(scheme, weight.to(torch.float32))
    if columns is not None:
        if not options.get("static_groups", True):
            raise ValueError(f"GPTQ: {scheme.name} keeps the scales of round-to-nearest (static groups); "
                             f"drop static_groups: false")  # fmt: skip
        w_t, hinv, perm = _prepared(weight, hessian, columns.padded_in_features, act_order, damp)
        order = perm.tolist()
        _sweep(w_t, hinv, block_size, lambda column, col: columns.quantize_column(order[column], col))
        return columns.finish()
    grid = integer_scheme(scheme, "gptq")
    static_groups = bool(options.get("static_groups", act_order))
    if act_order and not static_groups:
        raise ValueError("GPTQ: act_order needs static_groups (kernels take no g_idx); drop static_groups: false")
    n, k = weight.shape
    kp = grid.padded_in_features(k)
    group = grid.group_size_for(k)
    lo, hi = code_range(grid)

    column_group = torch.arange(kp) // group  # original column → its group
    if static_groups:
        scales, zeros = grid.compute_scales(weight.to(torch.float32))
        zero_points = offsets(grid, zeros, scales)
    else:
        scales = torch.ones(n, kp // group)
        zero_points = torch.zeros_like(scales)
    w_t, hinv, perm = _prepared(weight, hessian, kp, act_order, damp)
    scale_t, zero_t = scales.t()[column_group[perm]].contiguous(), zero_points.t()[column_group[perm]].contiguous()

    def refresh(column, block, i, end):  # dynamic groups: params from the updated weight
        if column % group:
            return
        g = column // group
        span = torch.cat([block[i:], w_t[end:]])[:group].t()
        s, z = grid.compute_scales(span)
        scales[:, g], zero_points[:, g] = s[:, 0], offsets(grid, z, s)[:, 0]
        scale_t[column : column + group], zero_t[column : column + group] = scales[:, g], zero_points[:, g]

    def quantize(column, col):
        scale, zero = scale_t[column], zero_t[column]
        return torch.clamp_(torch.round_(col / scale + zero), lo, hi).sub_(zero).mul_(scale)

    q = _sweep(w_t, hinv, block_size, quantize, None if static_groups else refresh).t()
    if act_order:
        q = q[:, torch.argsort(perm)]
    zeros_out = None if grid.symmetric else zero_points
    return grid.quantize_with(q[:, :k], scales, zeros_out)


def _run(scheme: Scheme, weight: torch.Tensor, stats, options: dict) -> QuantizedWeight:
    cached = stats.cached_result(scheme, weight, options)
    if cached is not None:  # quantized during block-by-block calibration, on this very weight
        return cached
    if stats.hessian is None:
        raise ValueError(f"site {stats.site}: GPTQ needs the input Hessian; the calibration statistics have none")
    return gptq_quantize(scheme, weight, stats.hessian, options)


register_algorithm(Algorithm("gptq", _run, needs_calibration=True, wants_hessian=True))
