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

**Block fine-tuning** (option ``finetune_steps`` > 0; default 0: off, results are the layer-wise optimum above),
as the AQLM reference after each block: during block-by-block calibration (:func:`block_pass`) every AQLM site of
the block gets its layer-wise result first; then, codes fixed, float32 copies of the codebooks ``C`` and scales
``s`` of the tuned sites take ``finetune_steps`` Adam steps (``finetune_lr``, default 1e-4, the reference's; betas
0.9, 0.999) on the block loss: the mean over calibration batches of the mean squared error between the block's output
with every AQLM site at its decoded weight and the block's float output (padding tokens left out when the batch has
an ``attention_mask``). Each step uses every batch. The iterate of lowest loss is kept, rounded to float16 (codebooks
and scales), and replaces the layer-wise results unless its loss after rounding exceeds theirs. Sites of one block
are tuned jointly under the options of the block's first site with ``finetune_steps`` > 0; AQLM sites of the block
without it keep their layer-wise result (held fixed in the loss). Sites outside the blocks (an output head) and models
without a block list keep the layer-wise result. Not implemented: tuning the block's other parameters (norms) and the
end-to-end fine-tuning (PV-tuning).

Options: ``iters``, ``beam``, ``tolerance``, ``cg_steps``, ``damp``, ``force``, ``finetune_steps``, ``finetune_lr``,
and the calibration ``seed``.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import torch

from qcompile.algorithms import Algorithm, register_algorithm
from qcompile.algorithms.autoround import _float_weight, _hidden, _masked
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
    finetune_steps: int = 0
    finetune_lr: float = 1e-4


def settings(options: dict | None) -> Settings:
    """The options of one AQLM run, checked by name and value (errors name the option)."""
    options = check_options("aqlm", options)
    out = Settings(int(options.get("iters", 10)), int(options.get("beam", 1)), float(options.get("tolerance", 0.01)),
                   int(options.get("cg_steps", 20)), float(options.get("damp", 0.01)),
                   bool(options.get("force", False)), int(options.get("seed", 0)),
                   int(options.get("finetune_steps", 0)), float(options.get("finetune_lr", 1e-4)))  # fmt: skip
    for name in ("iters", "cg_steps", "finetune_steps"):
        if getattr(out, name) < 0:
            raise ValueError(f"aqlm: option {name} must be >= 0, got {getattr(out, name)}")
    if out.beam < 1:
        raise ValueError(f"aqlm: option beam must be >= 1, got {out.beam}")
    if out.tolerance < 0 or out.damp < 0:
        raise ValueError(f"aqlm: options tolerance and damp must be >= 0, got {out.tolerance}, {out.damp}")
    if not out.finetune_lr > 0:
        raise ValueError(f"aqlm: option finetune_lr must be > 0, got {out.finetune_lr}")
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


class TunedSite:
    """Learnable float32 copies of one site's codebooks ``books [M, E, ig]`` and scales ``scales [N]`` around its
    fixed codes ``int64 [N, G, M]`` (from the layer-wise result ``start``)."""

    def __init__(self, scheme: Aqlm, start: AqlmWeight):
        self.scheme, self.start = scheme, start
        m, e, ig = scheme.num_codebooks, scheme.entries, scheme.group_size
        self.books = start.codebooks.to(torch.float32).reshape(m, e, ig).clone().requires_grad_(True)
        self.scales = start.scales.to(torch.float32).reshape(-1).clone().requires_grad_(True)
        self.codes = start.codes.reshape(-1, m)

    def weight(self) -> torch.Tensor:
        """``[N, K]`` float32, differentiable in the codebooks and scales: ``s_n · sum_m C[m, code]`` (the operations
        of :meth:`Aqlm.dequantize`)."""
        n = self.start.codes.shape[0]
        w = cb.decode(self.books, self.codes).reshape(n, -1)
        return (w * self.scales.reshape(n, 1))[:, : self.start.in_features]

    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.books.detach().clone(), self.scales.detach().clone()

    def result(self, state) -> AqlmWeight:
        """``state`` (codebooks, scales) rounded to float16, with the fixed codes."""
        books, scales = state
        m, e, ig = books.shape
        return AqlmWeight(self.start.codes, books.clamp(-65504.0, 65504.0).to(torch.float16).reshape(m, e, 1, ig),
                          scales.clamp(-65504.0, 65504.0).to(torch.float16).reshape(-1, 1, 1, 1),
                          self.start.in_features)  # fmt: skip


def _block_loss(block, inputs, targets, replaced: dict) -> float:
    """Mean over batches of the block output's MSE against ``targets`` with ``replaced`` weights (``{parameter
    path in block: tensor}``); accumulates the gradients of the tensors that require them."""
    total = 0.0
    for (args, kwargs, mask), target in zip(inputs, targets):
        out = _masked(_hidden(torch.func.functional_call(block, replaced, args, kwargs, strict=False)), mask)
        loss = (out.to(torch.float32) - target.to(torch.float32)).pow(2).mean() / len(inputs)
        if loss.requires_grad:
            loss.backward()
        total += float(loss.detach())
    return total


def finetune_block(block, prefix: str, inputs, modules: dict, entries: dict, results: dict[str, AqlmWeight],
                   tuned: list[str], config: Settings) -> tuple[dict[str, AqlmWeight], float, float]:  # fmt: skip
    """Adam on the codebooks and scales of the sites ``tuned`` of ``block`` (module path ``prefix``; ``modules``,
    ``entries``: every AQLM site of the block, ``results`` their layer-wise weights) against the block's float output
    on ``inputs`` (``(args, kwargs, mask)`` per batch), module docstring. Returns ``(results with the tuned sites
    replaced, block loss of the layer-wise results, block loss of the returned results)``."""
    with torch.no_grad():
        targets = [_masked(_hidden(block(*a, **kw)), m).detach() for a, kw, m in inputs]
    sites = {n: TunedSite(entries[n].parsed, results[n]) for n in tuned}
    fixed = {n: entries[n].parsed.dequantize(results[n]) for n in modules if n not in sites}

    def replaced(weights):
        out = {}
        for n, w in weights.items():
            w = w.t() if entries[n].site.transposed else w
            out[n[len(prefix) + 1 :] + ".weight"] = w.to(modules[n].weight.dtype)
        return out

    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            params = [p for s in sites.values() for p in (s.books, s.scales)]
            adam = torch.optim.Adam(params, lr=config.finetune_lr)
            best, best_state, before = float("inf"), None, None
            for step in range(config.finetune_steps + 1):  # the last pass only measures the last update
                leaves = {n: s.weight().detach().requires_grad_(True) for n, s in sites.items()}
                value = _block_loss(block, inputs, targets, replaced({**fixed, **leaves}))
                before = value if before is None else before
                if value < best:
                    best, best_state = value, {n: s.state() for n, s in sites.items()}
                if step == config.finetune_steps:
                    break
                adam.zero_grad()
                grads = {n: leaf.grad for n, leaf in leaves.items() if leaf.grad is not None}
                if grads:
                    torch.autograd.backward([sites[n].weight() for n in grads], list(grads.values()))
                adam.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    final = {**results, **{n: s.result(best_state[n]) for n, s in sites.items()}}
    with torch.no_grad():
        after = _block_loss(block, inputs, targets, replaced({n: entries[n].parsed.dequantize(final[n])
                                                             for n in modules}))  # fmt: skip
    if not after <= before:  # float16 rounding undid the gain: keep the layer-wise results
        return results, before, before
    return final, before, after


def _layerwise(scheme: Scheme, weight: torch.Tensor, stats, options: dict) -> AqlmWeight:
    if stats is None or stats.hessian is None:
        site = getattr(stats, "site", "?")
        raise ValueError(f"site {site}: AQLM needs the input Hessian; the calibration statistics have none")
    return aqlm_quantize(scheme, weight, stats.hessian, options, site=stats.site)


def block_pass(block, prefix: str, inputs, modules: dict, entries: dict, stats: dict) -> None:
    """When some AQLM site of ``block`` has ``finetune_steps`` > 0: the layer-wise result of every AQLM site of the
    block (``modules``: ``{name: linear}``), then :func:`finetune_block`; each final result is kept in
    ``stats[name]`` for the quantize stage. Prints one line: the block loss before and after. Otherwise nothing."""
    tuned = [n for n in modules if settings(dict(entries[n].options)).finetune_steps > 0]
    if not tuned:
        return
    config = settings(dict(entries[tuned[0]].options))
    started = time.perf_counter()
    weights = {n: _float_weight(modules[n], entries[n].site.transposed) for n in modules}
    results = {n: _layerwise(entries[n].parsed, weights[n], stats.get(n), dict(entries[n].options)) for n in modules}
    final, before, after = finetune_block(block, prefix, inputs, modules, entries, results, tuned, config)
    for n in modules:
        stats[n].remember(entries[n].parsed, weights[n], dict(entries[n].options), final[n])
    print(f"aqlm: {prefix}: {len(tuned)} sites fine-tuned, block loss {before:.4g} (layer-wise) -> {after:.4g}, "
          f"{config.finetune_steps} steps, {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


def _run(scheme: Scheme, weight: torch.Tensor, stats, options: dict) -> AqlmWeight:
    cached = None if stats is None else stats.cached_result(scheme, weight, options)
    if cached is not None:  # fine-tuned with its block during calibration, on this very weight
        return cached
    return _layerwise(scheme, weight, stats, options)


register_algorithm(Algorithm("aqlm", _run, needs_calibration=True, wants_hessian=True, block_pass=block_pass))
