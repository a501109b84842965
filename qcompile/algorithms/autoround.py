"""AutoRound (Cheng et al., 2023): choose each weight's rounding direction and each group's clipping range by
signed gradient descent, block by block, so the block's output with quantized weights matches its float output.

Per site, on the integer grid of its scheme (:func:`qcompile.algorithms.grid.integer_scheme`), grouped weight
``w [N, groups, group_size]`` (zero padded like round to nearest), learnable

* ``V [N, groups, group_size]`` in ``[-0.5, 0.5]``: rounding offsets, start 0;
* ``α, β [N, groups, 1]`` in ``[0.5, 1]``: clipping factors of the group's max and min (symmetric: ``α`` of
  ``max |w|``), start 1.

Fake quantization (``round`` passes the gradient straight through, ``clamp`` does not)::

    asymmetric:  s = (α·max − β·min) / (2**bits − 1)     z = −β·min / s          u ∈ [0, 2**bits − 1]
    symmetric:   s = α·max|w| / (2**(bits−1) − 1)        z = 2**(bits−1)         u ∈ [1, 2**bits − 1]
    u = clamp(round(w / s + z + V))        w_q = (u − z) · s

(``s = 1`` where the range is empty, as in :meth:`IntWeightOnly.compute_scales`). At ``V = 0, α = β = 1`` this is
exactly round to nearest. The loss is the mean squared error between the block's output with every AutoRound site of
the block fake-quantized and the block's output with float weights, on the block's calibration inputs (padding
tokens left out when the batch has an ``attention_mask``). SignSGD: ``p ← clamp(p − lr_t · sign(∂L/∂p))`` with
``lr_t = lr · (1 − t / iters)`` (``V``) and ``minmax_lr`` likewise (``α, β``); the parameters of the step with the
lowest loss are kept (``V = 0, α = β = 1`` among them: the kept loss never exceeds round to nearest's on the
step's batches). The codes and scales of the kept iterate are the site's result (the exact ``u, s, z`` of the fake
quantization, in the canonical form of :mod:`qcompile.schemes.integer`).

**Block grids** (GGUF's legacy types ``q4_0, q4_1, q5_0, q5_1, q8_0``, through ``scheme.affine_block_grid``): the
same ``V``, ``α``, ``β`` per block of 32, ``d`` and ``m`` rounded to float16 in the forward (straight through) so
the loss sees the values the file holds, the rounding that of llama.cpp's reference quantizer (so ``V = 0, α = β =
1`` is its round to nearest, bit for bit)::

    peak   (q4_0, q5_0):  d = α·max / −c,  q = clamp(⌊x/d + c + 0.5 + V⌋, 0, hi)      w_q = f16(d)·(q − c)
    range  (q4_1, q5_1):  d = (α·max − β·min) / hi,  m = β·min,
                          q = clamp(⌊(x − m)/d + 0.5 + V⌋, 0, hi)                    w_q = f16(d)·q + f16(m)
    absmax (q8_0):        d = α·max|x| / hi,  q = clamp(roundf(x/d + V), −hi, hi)    w_q = q·f16(d)

(``c`` 8 or 16, ``hi`` 15, 31 or 127; ``max`` in ``peak`` is the signed value of the largest ``|x|``; ``x/d`` is
``x · (1/d)``, ``1/d = 0`` where ``d = 0``). The result is the scheme's blocks of exactly those ``q``,
``f16(d)``, ``f16(m)``. K-quants and IQ4 types are refused by name.

Sites of one block are optimised jointly, under the options of the block's first AutoRound site. Sites outside the
blocks (an output head) and models without a block list are optimised alone against their own output ``x Wᵀ`` on
the input rows the calibration pass kept (up to 512, spread over the batches).

Options: ``iters`` (200), ``lr`` (``1 / iters``), ``minmax_lr`` (``lr``), ``nsamples`` (calibration batches used,
default all), ``batch_size`` (batches per step, 8), ``preset`` (``"default"``, ``"light"``: 50 iters, ``"best"``:
1000 iters; explicit options win), and the calibration pass's ``seed`` (order of the batches).
"""

from __future__ import annotations

import dataclasses
import sys
import time

import torch

from qcompile.algorithms import Algorithm, register_algorithm
from qcompile.algorithms.grid import code_range, integer_scheme
from qcompile.algorithms.options import check_options
from qcompile.schemes import QuantizedWeight, Scheme

PRESETS = {"default": {"iters": 200}, "light": {"iters": 50}, "best": {"iters": 1000}}


@dataclasses.dataclass(frozen=True)
class Settings:
    iters: int
    lr: float
    minmax_lr: float
    nsamples: int | None
    batch_size: int
    seed: int


def settings(options: dict | None) -> Settings:
    """The options of one AutoRound run, checked by name and value (errors name the option)."""
    options = check_options("autoround", options)
    preset = options.get("preset", "default")
    if preset not in PRESETS:
        raise ValueError(f"autoround: preset {preset!r} is unknown; presets: {', '.join(PRESETS)}")
    merged = {**PRESETS[preset], **{k: v for k, v in options.items() if k != "preset"}}
    iters = int(merged["iters"])
    if iters < 0:
        raise ValueError(f"autoround: iters must be >= 0, got {iters}")
    lr = float(merged.get("lr", 1.0 / max(iters, 1)))
    minmax_lr = float(merged.get("minmax_lr", lr))
    nsamples = merged.get("nsamples")
    batch_size = int(merged.get("batch_size", 8))
    if lr < 0 or minmax_lr < 0 or batch_size < 1 or (nsamples is not None and int(nsamples) < 1):
        raise ValueError(f"autoround: lr, minmax_lr must be >= 0 and batch_size, nsamples >= 1; got lr={lr}, "
                         f"minmax_lr={minmax_lr}, batch_size={batch_size}, nsamples={nsamples}")  # fmt: skip
    return Settings(iters, lr, minmax_lr, None if nsamples is None else int(nsamples), batch_size,
                    int(merged.get("seed", 0)))  # fmt: skip


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class SiteRounding:
    """The learnable rounding of one weight ``[N, K]`` (float32) on ``scheme``'s integer grid."""

    def __init__(self, scheme: Scheme, weight: torch.Tensor):
        self.grid = integer_scheme(scheme, "autoround")
        self.weight = weight.to(torch.float32)
        self.grouped = self.grid._grouped(self.weight)  # [N, groups, group_size]
        n, groups, _ = self.grouped.shape
        self.offsets = torch.zeros_like(self.grouped, requires_grad=True)  # V
        self.max_factor = torch.ones(n, groups, 1, requires_grad=True)  # α
        self.min_factor = torch.ones(n, groups, 1, requires_grad=True)  # β (unused when symmetric)
        self.lo, self.hi = code_range(self.grid)

    def parameters(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``([V], [α, β])``: the rounding offsets and the clipping factors."""
        return [self.offsets], [self.max_factor] + ([] if self.grid.symmetric else [self.min_factor])

    def scales_zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``s, z`` ``[N, groups, 1]`` from the clipped range (differentiable in α, β)."""
        g = self.grouped
        if self.grid.symmetric:
            s = g.abs().amax(-1, keepdim=True) * self.max_factor / (2 ** (self.grid.bits - 1) - 1)
            s = torch.where(s > 0, s, torch.ones_like(s))
            return s, torch.full_like(s, 2 ** (self.grid.bits - 1))
        hi = g.amax(-1, keepdim=True) * self.max_factor
        lo = g.amin(-1, keepdim=True) * self.min_factor
        s = (hi - lo) / (2**self.grid.bits - 1)
        s = torch.where(s > 0, s, torch.ones_like(s))
        return s, -lo / s

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(u, s, z)``: float codes ``[N, groups, group_size]`` (straight-through), scales and zeros."""
        s, z = self.scales_zeros()
        return torch.clamp(_round_ste(self.grouped / s + z + self.offsets), self.lo, self.hi), s, z

    def fake_weight(self) -> torch.Tensor:
        """``w_q [N, K]`` float32, differentiable in V, α, β."""
        u, s, z = self.codes()
        n = self.weight.shape[0]
        return ((u - z) * s).reshape(n, -1)[:, : self.weight.shape[1]]

    def clamp_(self) -> None:
        with torch.no_grad():
            self.offsets.clamp_(-0.5, 0.5)
            self.max_factor.clamp_(0.5, 1.0)
            self.min_factor.clamp_(0.5, 1.0)

    def state(self) -> tuple[torch.Tensor, ...]:
        return tuple(p.detach().clone() for p in (self.offsets, self.max_factor, self.min_factor))

    def load(self, state) -> None:
        with torch.no_grad():
            for p, v in zip((self.offsets, self.max_factor, self.min_factor), state):
                p.copy_(v)

    def result(self) -> QuantizedWeight:
        """The scheme's canonical form of the current iterate (the same ``u, s, z`` as :meth:`fake_weight`)."""
        with torch.no_grad():
            u, s, z = self.codes()
        n, k = self.weight.shape
        codes = u.reshape(n, -1)
        scales, zeros = s.squeeze(-1).contiguous(), None if self.grid.symmetric else z.squeeze(-1).contiguous()
        if self.grid.bits == 8:  # signed storage, as IntWeightOnly.quantize_with
            codes = (codes - 128).to(torch.int8)
            zeros = None if zeros is None else zeros - 128
        else:
            codes = codes.to(torch.uint8)
        return QuantizedWeight(codes.contiguous(), scales, zeros, k)


def _exact_ste(x: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """``exact`` in the forward (bit for bit, signed zeros kept when no gradient is taken), the gradient of ``x`` in
    the backward."""
    return exact + (x - x.detach()) if x.requires_grad else exact


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` (half away from zero), exactly."""
    a = x.abs()
    floor = torch.floor(a)
    return torch.sign(x) * (floor + torch.floor(2 * (a - floor)))


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """``d ? 1/d : 0`` in float32 (a zero block keeps codes at the offset and decodes to 0)."""
    nonzero = d != 0
    return torch.where(nonzero, 1 / torch.where(nonzero, d, torch.ones_like(d)), torch.zeros_like(d))


class BlockRounding:
    """The learnable rounding of one weight ``[N, K]`` (float32) on an affine block grid (``grid.rule`` one of the
    module docstring's ``peak``, ``range``, ``absmax``): blocks ``[R, qk]`` in row order, ``R = N · K_padded / qk``
    (zero padded on the right), ``V [R, qk]``, ``α, β [R, 1]``."""

    def __init__(self, grid, weight: torch.Tensor):
        self.grid = grid
        self.weight = weight.to(torch.float32)
        n, k = self.weight.shape
        padded = torch.nn.functional.pad(self.weight, (0, grid.scheme.padded_in_features(k) - k))
        self.blocks = padded.reshape(-1, grid.qk).contiguous()  # [R, qk]
        rows = self.blocks.shape[0]
        self.offsets = torch.zeros_like(self.blocks, requires_grad=True)  # V
        self.max_factor = torch.ones(rows, 1, requires_grad=True)  # α
        self.min_factor = torch.ones(rows, 1, requires_grad=True)  # β (range only)
        x = self.blocks
        self.peak = torch.gather(x, 1, x.abs().argmax(1, keepdim=True))  # signed value of the largest |x|, [R, 1]
        self.lo = -grid.hi if grid.rule == "absmax" else 0

    def parameters(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``([V], [α, β])``: the rounding offsets and the clipping factors."""
        return [self.offsets], [self.max_factor] + ([self.min_factor] if self.grid.rule == "range" else [])

    def fields(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(q, f16(d), f16(m))``: float codes ``[R, qk]`` (straight-through), ``d`` and ``m`` ``[R, 1]`` as float32
        holding float16 values (``m`` ``None`` unless ``range``); differentiable in V, α, β."""
        x, v, grid = self.blocks, self.offsets, self.grid
        m16 = None
        if grid.rule == "peak":
            d = self.max_factor * self.peak / -grid.offset
            y = x * _inverse(d) + (grid.offset + 0.5) + v
            q = _exact_ste(y, torch.floor(y.detach()))
        elif grid.rule == "range":
            hi, lo = x.amax(1, keepdim=True) * self.max_factor, x.amin(1, keepdim=True) * self.min_factor
            d = (hi - lo) / grid.hi
            y = (x - lo) * _inverse(d) + 0.5 + v
            q = _exact_ste(y, torch.floor(y.detach()))
            m16 = _exact_ste(lo, lo.detach().to(torch.float16).to(torch.float32))
        else:
            d = x.abs().amax(1, keepdim=True) * self.max_factor / grid.hi
            y = x * _inverse(d) + v
            q = _exact_ste(y, _roundf(y.detach()))
        q = torch.clamp(q, self.lo, grid.hi)
        return q, _exact_ste(d, d.detach().to(torch.float16).to(torch.float32)), m16

    def _values(self, q, d16, m16) -> torch.Tensor:
        if self.grid.rule == "peak":
            return d16 * (q - self.grid.offset)
        if self.grid.rule == "range":
            return d16 * q + m16
        return q * d16

    def fake_weight(self) -> torch.Tensor:
        """``w_q [N, K]`` float32, differentiable in V, α, β: the values the written blocks decode to."""
        n, k = self.weight.shape
        return self._values(*self.fields()).reshape(n, -1)[:, :k]

    def clamp_(self) -> None:
        with torch.no_grad():
            self.offsets.clamp_(-0.5, 0.5)
            self.max_factor.clamp_(0.5, 1.0)
            self.min_factor.clamp_(0.5, 1.0)

    def state(self) -> tuple[torch.Tensor, ...]:
        return tuple(p.detach().clone() for p in (self.offsets, self.max_factor, self.min_factor))

    def load(self, state) -> None:
        with torch.no_grad():
            for p, v in zip((self.offsets, self.max_factor, self.min_factor), state):
                p.copy_(v)

    def result(self):
        """The scheme's unpacked blocks of the current iterate (the same ``q, f16(d), f16(m)`` as
        :meth:`fake_weight`)."""
        with torch.no_grad():
            q, d16, m16 = self.fields()
        n, k = self.weight.shape
        return self.grid.weight(q, d16, m16, n, k)


def site_rounding(scheme: Scheme, weight: torch.Tensor, site: str = "?"):
    """The learnable rounding of ``weight [N, K]`` on ``scheme``: its integer grid (:class:`SiteRounding`) or its
    affine block grid (:class:`BlockRounding`); an error naming the site and the scheme otherwise."""
    make = getattr(scheme, "affine_block_grid", None)
    try:
        if scheme.integer_grid() is None and make is not None:
            return BlockRounding(make("autoround"), weight)
        return SiteRounding(scheme, weight)
    except ValueError as error:
        raise ValueError(f"site {site}: {error}") from None


def optimise(sites: list[SiteRounding], loss_of, items: int, config: Settings) -> tuple[float, float]:
    """SignSGD over ``sites`` jointly; ``loss_of(batch: list[int]) -> scalar tensor`` for item indices ``batch``
    (the fake weights are read through the sites). Loads the best iterate; returns ``(loss at start, best loss)``."""
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(items, generator=generator).tolist()
    batch = min(config.batch_size, items)
    rounding = [p for s in sites for p in s.parameters()[0]]
    clipping = [p for s in sites for p in s.parameters()[1]]
    best, first, best_state = float("inf"), None, [s.state() for s in sites]
    for step in range(config.iters + 1):  # the last pass only measures the last update
        start = (step * batch) % items
        chosen = [order[(start + i) % items] for i in range(batch)]
        with torch.enable_grad():
            loss = loss_of(chosen)
            value = float(loss.detach())
            first = value if first is None else first
            if value < best:
                best, best_state = value, [s.state() for s in sites]
            if step == config.iters:
                break
            grads = torch.autograd.grad(loss, rounding + clipping, allow_unused=True)
        decay = 1.0 - step / config.iters
        with torch.no_grad():
            for p, g in zip(rounding + clipping, grads):
                if g is not None:
                    p.sub_(torch.sign(g), alpha=(config.lr if _is_in(p, rounding) else config.minmax_lr) * decay)
        for s in sites:
            s.clamp_()
    for s, state in zip(sites, best_state):
        s.load(state)
    return (first if first is not None else float("nan")), best


def _is_in(p, params) -> bool:
    return any(p is q for q in params)


def _float_weight(module, transposed: bool) -> torch.Tensor:
    weight = module.weight
    return (weight.detach().t() if transposed else weight.detach()).to(torch.float32).contiguous()


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _masked(y: torch.Tensor, mask) -> torch.Tensor:
    if mask is not None and y.dim() == 3 and tuple(y.shape[:2]) == tuple(mask.shape):
        return y[mask.to(y.device) != 0]
    return y


def block_pass(block, prefix: str, inputs, modules: dict, entries: dict, stats: dict) -> None:
    """Optimise the AutoRound sites ``modules`` (``{name: linear}``) of ``block`` (module path ``prefix``) jointly on
    the block's calibration ``inputs`` (``(args, kwargs, mask)`` per batch); each result is kept in ``stats[name]``
    for the quantize stage. Prints one line: the block's loss at round to nearest and after."""
    names = list(modules)
    first = entries[names[0]]
    config = settings(dict(first.options))
    inputs = inputs[: config.nsamples] if config.nsamples else inputs
    weights = {n: _float_weight(modules[n], entries[n].site.transposed) for n in names}
    sites = {n: site_rounding(entries[n].parsed, weights[n], n) for n in names}
    started = time.perf_counter()
    with torch.no_grad():
        targets = [_masked(_hidden(block(*a, **kw)), m).detach() for a, kw, m in inputs]
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)

    def loss_of(chosen):
        replaced = {}
        for n in names:
            w_q = sites[n].fake_weight()
            w_q = w_q.t() if entries[n].site.transposed else w_q
            replaced[n[len(prefix) + 1 :] + ".weight"] = w_q.to(modules[n].weight.dtype)
        total = 0.0
        for i in chosen:
            args, kwargs, mask = inputs[i]
            out = _masked(_hidden(torch.func.functional_call(block, replaced, args, kwargs, strict=False)), mask)
            total = total + (out.to(torch.float32) - targets[i].to(torch.float32)).pow(2).mean()
        return total / len(chosen)

    try:
        before, after = optimise(list(sites.values()), loss_of, len(inputs), config)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    for n in names:
        stats[n].remember(entries[n].parsed, weights[n], dict(entries[n].options), sites[n].result())
    print(f"autoround: {prefix}: {len(names)} sites, loss {before:.4g} (round to nearest) -> {after:.4g}, "
          f"{config.iters} iters, {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)  # fmt: skip


def autoround_site(scheme: Scheme, weight: torch.Tensor, inputs: torch.Tensor, options: dict | None = None,
                   site: str = "?"):
    """One site alone: ``(QuantizedWeight, loss at round to nearest, best loss)`` for ``weight [N, K]`` against its
    own output on input rows ``inputs [S, K]`` (``batch_size`` / ``nsamples`` count rows here)."""
    config = settings(options)
    x = inputs.to(torch.float32)
    x = x[: config.nsamples] if config.nsamples else x
    rounding = site_rounding(scheme, weight, site)
    target = x @ rounding.weight.t()
    rows = x.shape[0]
    config = dataclasses.replace(config, batch_size=max(config.batch_size, rows))  # rows are few: use them all

    def loss_of(chosen):
        return (x[chosen] @ rounding.fake_weight().t() - target[chosen]).pow(2).mean()

    before, after = optimise([rounding], loss_of, rows, config)
    return rounding.result(), before, after


def _run(scheme: Scheme, weight: torch.Tensor, stats, options: dict) -> QuantizedWeight:
    settings(options)
    cached = None if stats is None else stats.cached_result(scheme, weight, options)
    if cached is not None:  # optimised with its block during calibration, on this very weight
        return cached
    if stats is None or stats.inputs is None:
        raise ValueError(f"site {getattr(stats, 'site', '?')}: AutoRound needs calibration inputs; the calibration "
                         "statistics have none")  # fmt: skip
    q, before, after = autoround_site(scheme, weight, stats.inputs, options, stats.site)
    print(f"autoround: {stats.site}: loss {before:.4g} (round to nearest) -> {after:.4g}", file=sys.stderr, flush=True)
    return q


register_algorithm(Algorithm("autoround", _run, needs_calibration=True, wants_inputs=True,
                             block_pass=block_pass))
