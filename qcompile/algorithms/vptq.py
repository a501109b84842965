"""VPTQ (Liu et al. 2024, arXiv:2409.17066): choose the indices and codebooks of a ``vptq-v<v>-k<Kc>[-r<Kr>][-o<o>]``
weight that keep the layer's output error ``||(W - Ŵ) Xᵀ||² = tr((W - Ŵ) H (W - Ŵ)ᵀ)`` small, with ``H = 2/n · Σ x xᵀ``
(``[K, K]``, the statistics GPTQ collects, :mod:`qcompile.algorithms.calibrate`).

1. **Order and normalisation**: columns in act order (decreasing ``H_jj``: the permutation ``perm``), per-column
   scale and bias as the data-free quantization (:meth:`qcompile.schemes.vptq.Vptq.prepare`). In normalised
   coordinates ``Q`` the error is ``tr((Qn - Q) H' (Qn - Q)ᵀ)`` with ``H' = D H[perm][:, perm] D``, ``D`` the
   permuted scales.
2. **Codebook init**: Hessian-weighted k-means of the column vectors (``v`` outputs of one column), each vector
   weighted by ``H_jj · scale_j²`` (``kmeans_iters``, default 10; residual and outlier codebooks likewise).
3. **Column sweep with error feedback** (GPTQ's, :func:`qcompile.algorithms.gptq._sweep` on ``H'``): column by
   column, each of its vectors becomes its nearest main centroid (then the nearest residual centroid to what is
   left; outlier columns their outlier codebook's), and the column's error is spread over the columns not yet visited
   through the inverse Hessian factor (``damp``, default 0.01; ``block_size``, default 128).
4. **Codebook refit** (``refit_steps`` conjugate-gradient steps, default 10; 0: none): with the indices fixed the
   loss is a convex quadratic in all codebook entries together; CG from the current entries never raises it. Then
   codebooks to float16.

A layer with fewer main vectors (``ceil(N/v) · (K - o)``) than ``MIN_VECTORS_PER_CENTROID · Kc`` is refused, naming
it and the numbers (the codebook would hold the layer itself); option ``force: true`` quantizes it anyway.

Not implemented: VPTQ's layer-wise and end-to-end fine-tuning of the codebooks.

Options: ``damp``, ``block_size``, ``kmeans_iters``, ``refit_steps``, ``force``, and the calibration ``seed``.
"""

from __future__ import annotations

import dataclasses

import torch

from qcompile.algorithms import Algorithm, register_algorithm
from qcompile.algorithms.gptq import _inverse_hessian_factor, _one_thread, _sweep
from qcompile.algorithms.options import check_options
from qcompile.schemes import Scheme
from qcompile.schemes import aqlm_codebooks as cb
from qcompile.schemes.vptq import KMEANS_ITERS, Vptq, VptqWeight

MIN_VECTORS_PER_CENTROID = 4


@dataclasses.dataclass(frozen=True)
class Settings:
    damp: float = 0.01
    block_size: int = 128
    kmeans_iters: int = KMEANS_ITERS
    refit_steps: int = 10
    force: bool = False
    seed: int = 0


def settings(options: dict | None) -> Settings:
    """The options of one VPTQ run, checked by name and value (errors name the option)."""
    options = check_options("vptq", options)
    out = Settings(float(options.get("damp", 0.01)), int(options.get("block_size", 128)),
                   int(options.get("kmeans_iters", KMEANS_ITERS)), int(options.get("refit_steps", 10)),
                   bool(options.get("force", False)), int(options.get("seed", 0)))  # fmt: skip
    for name in ("kmeans_iters", "refit_steps"):
        if getattr(out, name) < 0:
            raise ValueError(f"vptq: option {name} must be >= 0, got {getattr(out, name)}")
    if out.block_size < 1:
        raise ValueError(f"vptq: option block_size must be >= 1, got {out.block_size}")
    if out.damp < 0:
        raise ValueError(f"vptq: option damp must be >= 0, got {out.damp}")
    return out


def check_size(scheme: Vptq, n: int, k: int, force: bool, site: str = "layer") -> None:
    vectors = scheme.vector_rows(n) * scheme.main_columns(k)
    wanted = MIN_VECTORS_PER_CENTROID * scheme.centroids
    if not force and vectors < wanted:
        raise ValueError(f"site {site}: {scheme.name} on [N={n}, K={k}] has {vectors} vectors of {scheme.vector_len} "
                         f"for {scheme.centroids} centroids (at least {MIN_VECTORS_PER_CENTROID} x "
                         f"{scheme.centroids} = {wanted} wanted): the codebook would hold the layer itself; use "
                         f"fewer centroids, or option force: true")  # fmt: skip


def _books(scheme: Vptq, main, res, out) -> tuple[torch.Tensor, dict[str, slice]]:
    """All codebooks stacked ``[E_total, v]`` (float64) and each one's rows."""
    parts = {"main": main, "res": res, "out": out}
    spans, rows, at = {}, [], 0
    for key, book in parts.items():
        if book is not None:
            spans[key] = slice(at, at + book.shape[0])
            rows.append(book.double())
            at += book.shape[0]
    return torch.cat(rows), spans


def _refit(scheme, q, h, books, spans, codes, res_codes, out_codes, steps):
    """CG on the codebook entries for fixed indices: minimise ``tr((q - dec) h (q - dec)ᵀ)``."""
    o, v = scheme.outliers, scheme.vector_len
    main_idx = codes + spans["main"].start
    res_idx = None if res_codes is None else res_codes + spans["res"].start
    out_idx = None if out_codes is None else out_codes + spans["out"].start

    def decode(b):
        cols = [scheme.decode_columns(out_idx, b)] if out_idx is not None else []
        main = scheme.decode_columns(main_idx, b)
        if res_idx is not None:
            main = main + scheme.decode_columns(res_idx, b)
        return torch.cat([*cols, main], 1).double()

    def adjoint(g):  # [R*v, K] -> [E_total, v]
        r = g.shape[0] // v
        out = torch.zeros_like(books)

        def add(idx, cols):
            vec = g[:, cols].reshape(r, v, -1).permute(0, 2, 1).reshape(-1, v)
            out.index_add_(0, idx.reshape(-1), vec)

        if out_idx is not None:
            add(out_idx, slice(0, o))
        add(main_idx, slice(o, None))
        if res_idx is not None:
            add(res_idx, slice(o, None))
        return out

    x = books.clone()
    r = adjoint(q @ h) - adjoint(decode(x) @ h)
    p, rr = r.clone(), float((r * r).sum())
    start = rr
    for _ in range(steps):
        if rr <= 1e-24 * max(start, 1e-300):
            break
        ap = adjoint(decode(p) @ h)
        pap = float((p * ap).sum())
        if pap <= 0:
            break
        alpha = rr / pap
        x += alpha * p
        r -= alpha * ap
        rr, previous = float((r * r).sum()), rr
        p = r + (rr / previous) * p
    return x


def vptq_quantize(scheme: Vptq, weight: torch.Tensor, hessian: torch.Tensor, options: dict | None = None,
                  site: str = "layer") -> VptqWeight:  # fmt: skip
    """VPTQ of ``weight [N, K]`` given ``hessian [K, K]`` (module docstring); one intra-op thread (the column loop
    is many small ops, as GPTQ's)."""
    with _one_thread():
        return _vptq(scheme, weight, hessian, options, site)


def _vptq(scheme, weight, hessian, options, site) -> VptqWeight:
    if not isinstance(scheme, Vptq):
        raise ValueError(f"site {site}: the vptq algorithm writes vptq schemes, not {scheme.name}")
    opts = settings(options)
    n, k = weight.shape
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"site {site}: the Hessian is {list(hessian.shape)}, expected [{k}, {k}]")
    check_size(scheme, n, k, opts.force, site)
    h = hessian.to(torch.float64)
    q, scale, bias, perm, column_weights = scheme.prepare(weight, torch.diag(h).clamp(min=0))
    d = scale.double()[perm]
    hp = h[perm][:, perm] * d[:, None] * d[None, :]
    main, res, out = scheme.codebooks(q, column_weights, opts.seed, opts.kmeans_iters)
    w = q.clone()
    hinv = _inverse_hessian_factor(hp, w, opts.damp)  # zeroes dead columns of w
    v, o, r = scheme.vector_len, scheme.outliers, q.shape[0] // scheme.vector_len
    codes = torch.zeros(r, k - o, dtype=torch.int64)
    res_codes = torch.zeros(r, k - o, dtype=torch.int64) if res is not None else None
    out_codes = torch.zeros(r, o, dtype=torch.int64) if o else None

    def quantize(column, values):
        points = values.reshape(r, v)
        if column < o:
            out_codes[:, column] = cb.nearest(points, out)
            return out[out_codes[:, column]].reshape(-1)
        c, rc, decoded = scheme.assign(points, main, res)
        codes[:, column - o] = c
        if rc is not None:
            res_codes[:, column - o] = rc
        return decoded.reshape(-1)

    _sweep(w.t().contiguous(), hinv, opts.block_size, quantize)
    books, spans = _books(scheme, main, res, out)
    if opts.refit_steps:
        hd = hp.clone()
        diag = torch.arange(k)
        hd[diag, diag] += opts.damp * torch.diag(hd).mean()
        books = _refit(scheme, w.double(), hd, books, spans, codes, res_codes, out_codes, opts.refit_steps)
    half = scheme.half(books.float())
    pick = {key: half[span] for key, span in spans.items()}
    return VptqWeight(codes, res_codes, out_codes, pick["main"], pick.get("res"), pick.get("out"), scale, bias, perm,
                      n, k)  # fmt: skip


def _run(scheme: Scheme, weight: torch.Tensor, stats, options: dict) -> VptqWeight:
    if stats is None or stats.hessian is None:
        site = getattr(stats, "site", "?")
        raise ValueError(f"site {site}: VPTQ needs the input Hessian; the calibration statistics have none")
    return vptq_quantize(scheme, weight, stats.hessian, options, site=stats.site)


register_algorithm(Algorithm("vptq", _run, needs_calibration=True, wants_hessian=True))
