"""AQLM (Egiazarian et al. 2024, arXiv:2401.06118): learn codes, codebooks and per-row scales of an ``aqlm-<M>x<B>``
weight that minimise the layer's output error on calibration inputs ``X``::

    L(codes, C, s) = ||(W - Ŵ) Xᵀ||² = tr((W - Ŵ) H (W - Ŵ)ᵀ)        Ŵ[n, g*ig + j] = s_n * sum_m C[m, codes[n,g,m], j]

with ``H = 2/n · Σ x xᵀ`` (``[K, K]``), the statistics GPTQ collects (:mod:`qcompile.algorithms.calibrate`),
zero-padded to ``Kp`` and damped: ``H += damp · mean(diag H) · I`` (option ``damp``, default 0.01; input channels no
activation reached get ``H_jj = 1``). Everything below runs in float64.

1. **Initialisation**: the data-free quantization of :meth:`qcompile.schemes.aqlm.Aqlm.quantize` before rounding
   (row-RMS scales, residual k-means of the groups, least-squares refinement), seeded by the calibration ``seed``.
2. Then ``iters`` rounds (default 10) of, in order:

   a. **codes**: group by group (all rows at once), a beam search of width ``beam`` (default 1: greedy) over the
      ``M`` codes of the group, codebook by codebook. A candidate block change ``δ`` (the group's ``ig`` weights
      before scaling) changes the loss by ``-2 s δ·(E H)_g + s² δᵀ H_gg δ`` where ``E = W - Ŵ`` is the current error:
      the full ``H`` couples the group to every other column through ``E H``, kept up to date after each accepted
      change (a rank-``ig`` update), and ``H_gg`` is the group's ``ig x ig`` diagonal block. A group keeps its codes
      unless the best beam lowers the loss, so the loss never rises.
   b. **codebooks**: with codes and scales fixed, ``L`` is a convex quadratic in the codebook entries; ``cg_steps``
      (default 20) conjugate-gradient steps on its normal equations, from the current entries (never raises ``L``).
   c. **scales**: per row the closed-form least squares ``s_n = (w_n H d_nᵀ) / (d_n H d_nᵀ)`` (``d_n`` the row's
      decoded entries before scaling).

   Stops early when a round lowers the relative error ``L / tr(W H Wᵀ)`` by less than ``tolerance`` (default 0.01)
   of its value (the AQLM reference's relative-MSE rule).
3. **Rounding**: codebooks to float16, one more greedy code pass and scale fit for the rounded entries, scales to
   float16.

A layer with fewer weight groups (``N * Kp / ig``) than ``MIN_GROUPS_PER_ENTRY`` times the codebook entries
(``2**B``) is refused, naming it and the numbers: its codebooks would memorise the layer (aqlm-1x16 on 576 x 576: 41472
groups, 65536 entries); option ``force: true`` quantizes it anyway.

Not implemented: the reference's block fine-tuning of codebooks and scales on the block's outputs and the end-to-end
fine-tuning (PV-tuning); results are the layer-wise optimum above.

Options: ``iters``, ``beam``, ``tolerance``, ``cg_steps``, ``damp``, ``force``, and the calibration ``seed``.
"""

from __future__ import annotations

import dataclasses

import torch

from qcompile.algorithms import Algorithm, register_algorithm
from qcompile.algorithms.gptq import _one_thread
from qcompile.algorithms.options import check_options
from qcompile.schemes import Scheme
from qcompile.schemes import aqlm_codebooks as cb
from qcompile.schemes.aqlm import Aqlm, AqlmWeight

MIN_GROUPS_PER_ENTRY = 4
#: candidate scores held at once in the code search (rows x beam x entries, float64)
SEARCH_ELEMENTS = 1 << 22


@dataclasses.dataclass(frozen=True)
class Settings:
    iters: int = 10
    beam: int = 1
    tolerance: float = 0.01
    cg_steps: int = 20
    damp: float = 0.01
    force: bool = False
    seed: int = 0


def settings(options: dict | None) -> Settings:
    """The options of one AQLM run, checked by name and value (errors name the option)."""
    options = check_options("aqlm", options)
    out = Settings(int(options.get("iters", 10)), int(options.get("beam", 1)), float(options.get("tolerance", 0.01)),
                   int(options.get("cg_steps", 20)), float(options.get("damp", 0.01)),
                   bool(options.get("force", False)), int(options.get("seed", 0)))  # fmt: skip
    for name in ("iters", "cg_steps"):
        if getattr(out, name) < 0:
            raise ValueError(f"aqlm: option {name} must be >= 0, got {getattr(out, name)}")
    if out.beam < 1:
        raise ValueError(f"aqlm: option beam must be >= 1, got {out.beam}")
    if out.tolerance < 0 or out.damp < 0:
        raise ValueError(f"aqlm: options tolerance and damp must be >= 0, got {out.tolerance}, {out.damp}")
    return out


def check_size(scheme: Aqlm, n: int, k: int, force: bool, site: str = "layer") -> None:
    groups = n * scheme.padded_in_features(k) // scheme.group_size
    if not force and groups < MIN_GROUPS_PER_ENTRY * scheme.entries:
        wanted = MIN_GROUPS_PER_ENTRY * scheme.entries
        raise ValueError(f"site {site}: {scheme.name} on [N={n}, K={k}] has {groups} weight groups of "
                         f"{scheme.group_size} for codebooks of {scheme.entries} entries (at least "
                         f"{MIN_GROUPS_PER_ENTRY} x {scheme.entries} = {wanted} wanted): the codebooks would hold "
                         f"the layer itself; use fewer bits per code, or option force: true")  # fmt: skip


def damped(hessian: torch.Tensor, kp: int, damp: float) -> torch.Tensor:
    """float64 ``[Kp, Kp]``: ``hessian [K, K]`` zero-padded, dead channels ``H_jj = 1``, ``+ damp·mean(diag)·I``."""
    k = hessian.shape[0]
    h = torch.zeros(kp, kp, dtype=torch.float64)
    h[:k, :k] = hessian.to(torch.float64)
    diag = torch.arange(kp)
    dead = torch.diag(h) <= 0
    h[diag[dead], diag[dead]] = 1.0
    h[diag, diag] += damp * torch.diag(h).mean()
    return h


class Problem:
    """The state of one layer: ``w [N, Kp]``, ``h [Kp, Kp]``, ``books [M, E, ig]``, ``codes int64 [N, G, M]``,
    ``s [N]`` (all float64), and the error terms ``err = w - s·d`` and ``err_h = err @ h``."""

    def __init__(self, w, h, books, codes, s):
        self.w, self.h, self.books, self.codes, self.s = w, h, books, codes, s
        self.n, self.kp = w.shape
        self.m, self.entries, self.ig = books.shape
        self.groups = self.kp // self.ig
        self.base = float(((w @ h) * w).sum())
        self.refresh()

    def decoded(self, books=None) -> torch.Tensor:
        """``d [N, Kp]``: the rows' entries summed, before scaling."""
        return cb.decode(self.books if books is None else books, self.codes.reshape(-1, self.m)).reshape(self.n, -1)

    def refresh(self) -> None:
        self.d = self.decoded()
        self.err = self.w - self.s[:, None] * self.d
        self.err_h = self.err @ self.h

    def loss(self) -> float:
        """``tr(E H Eᵀ) / tr(W H Wᵀ)``."""
        return float((self.err_h * self.err).sum()) / max(self.base, 1e-300)

    # -- codes ------------------------------------------------------------------------------------------------------
    def update_codes(self, beam: int) -> None:
        rows = max(1, SEARCH_ELEMENTS // (beam * self.entries))
        for g in range(self.groups):
            for r0 in range(0, self.n, rows):
                self._search(g, slice(r0, min(self.n, r0 + rows)), beam)

    def _search(self, g: int, rows: slice, beam: int) -> None:
        cols = slice(g * self.ig, (g + 1) * self.ig)
        hg = self.h[cols, cols]
        s = self.s[rows, None]
        v = self.err_h[rows, cols]  # [R, ig]
        a = self.d[rows, cols]  # [R, ig]: the block now
        codes = self.codes[rows, g].unsqueeze(1)  # [R, 1, M]
        block = a.unsqueeze(1)  # [R, beams, ig]
        for m in range(self.m):
            book = self.books[m]  # [E, ig]
            base = block - book[codes[..., m]]
            u = base - a.unsqueeze(1)
            cv = v @ book.t()  # [R, E]
            chc = ((book @ hg) * book).sum(-1)  # [E]
            uh = u @ hg
            cost = (-2 * s.unsqueeze(-1) * ((u * v.unsqueeze(1)).sum(-1, keepdim=True) + cv.unsqueeze(1))
                    + (s * s).unsqueeze(-1) * ((uh * u).sum(-1, keepdim=True) + 2 * uh @ book.t() + chc))  # fmt: skip
            flat = cost.reshape(cost.shape[0], -1)
            keep = min(beam, flat.shape[1])
            best_cost, best = torch.topk(flat, keep, dim=1, largest=False)
            parent, code = best // self.entries, best % self.entries
            codes = torch.gather(codes, 1, parent.unsqueeze(-1).expand(-1, -1, self.m)).clone()
            codes[..., m] = code
            block = torch.gather(base, 1, parent.unsqueeze(-1).expand(-1, -1, self.ig)) + book[code]
        better = best_cost[:, 0] < 0  # the best beam, when it lowers the loss
        if not better.any():
            return
        index = torch.arange(rows.start, rows.stop)[better]
        delta = block[better, 0] - a[better]  # [R', ig]
        self.codes[index, g] = codes[better, 0]
        self.d[index, cols] += delta
        step = self.s[index, None] * delta
        self.err[index, cols] -= step
        self.err_h[index] -= step @ self.h[cols, :]

    # -- codebooks and scales ---------------------------------------------------------------------------------------
    def _adjoint(self, r: torch.Tensor) -> torch.Tensor:
        """``[M, E, ig]``: the gradient map of :meth:`decoded`: ``r [N, Kp]`` summed into the entries its groups
        use."""
        groups = r.reshape(-1, self.ig)
        out = torch.zeros_like(self.books)
        for m in range(self.m):
            out[m].index_add_(0, self.codes[..., m].reshape(-1), groups)
        return out

    def _normal(self, books: torch.Tensor) -> torch.Tensor:
        s = self.s[:, None]
        return self._adjoint((s * s * self.decoded(books)) @ self.h)

    def update_codebooks(self, steps: int) -> None:
        """Conjugate gradients on ``A θ = b`` (``A θ = adjoint(s² decode(θ) H)``, ``b = adjoint(s W H)``)."""
        if steps == 0:
            return
        x = self.books.clone()
        r = self._adjoint(self.s[:, None] * self.w @ self.h) - self._normal(x)
        p, rr = r.clone(), float((r * r).sum())
        scale = rr
        for _ in range(steps):
            if rr <= 1e-24 * max(scale, 1e-300):
                break
            ap = self._normal(p)
            pap = float((p * ap).sum())
            if pap <= 0:
                break
            alpha = rr / pap
            x += alpha * p
            r -= alpha * ap
            rr, previous = float((r * r).sum()), rr
            p = r + (rr / previous) * p
        self.books = x
        self.refresh()

    def update_scales(self) -> None:
        dh = self.d @ self.h
        num, den = (self.w * dh).sum(1), (self.d * dh).sum(1)
        self.s = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), self.s)
        self.refresh()


def aqlm_quantize(scheme: Aqlm, weight: torch.Tensor, hessian: torch.Tensor, options: dict | None = None,
                  site: str = "layer", history: list | None = None) -> AqlmWeight:  # fmt: skip
    """AQLM of ``weight [N, K]`` given ``hessian [K, K]`` (module docstring). ``history``, when given, receives the
    relative error after the initialisation and after each round. Runs on one intra-op thread: the group loop is
    many small ops (as GPTQ's column loop)."""
    with _one_thread():
        return _aqlm(scheme, weight, hessian, options, site, history)


def _aqlm(scheme, weight, hessian, options, site, history) -> AqlmWeight:
    if not isinstance(scheme, Aqlm):
        raise ValueError(f"site {site}: the aqlm algorithm writes aqlm schemes, not {scheme.name}")
    opts = settings(options)
    n, k = weight.shape
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"site {site}: the Hessian is {list(hessian.shape)}, expected [{k}, {k}]")
    check_size(scheme, n, k, opts.force, site)
    groups, norm, books, codes = scheme.initial(weight, opts.seed)
    kp = groups.shape[1] * scheme.group_size
    problem = Problem(groups.reshape(n, kp).double(), damped(hessian, kp, opts.damp), books.double(),
                      codes.reshape(n, -1, scheme.num_codebooks), norm.double())  # fmt: skip
    problem.update_scales()
    loss = problem.loss()
    history = [] if history is None else history
    history.append(loss)
    for _ in range(opts.iters):
        problem.update_codes(opts.beam)
        problem.update_codebooks(opts.cg_steps)
        problem.update_scales()
        previous, loss = loss, problem.loss()
        history.append(loss)
        if previous - loss < opts.tolerance * previous:
            break
    books16 = problem.books.clamp(-65504.0, 65504.0).to(torch.float16)
    problem.books = books16.double()
    problem.refresh()
    problem.update_codes(1)
    problem.update_scales()
    history.append(problem.loss())
    scales = problem.s.clamp(-65504.0, 65504.0).to(torch.float16).reshape(n, 1, 1, 1)
    return AqlmWeight(problem.codes, books16.reshape(scheme.num_codebooks, scheme.entries, 1, scheme.group_size),
                      scales, k)  # fmt: skip


def _run(scheme: Scheme, weight: torch.Tensor, stats, options: dict) -> AqlmWeight:
    if stats is None or stats.hessian is None:
        site = getattr(stats, "site", "?")
        raise ValueError(f"site {site}: AQLM needs the input Hessian; the calibration statistics have none")
    return aqlm_quantize(scheme, weight, stats.hessian, options, site=stats.site)


register_algorithm(Algorithm("aqlm", _run, needs_calibration=True, wants_hessian=True))
