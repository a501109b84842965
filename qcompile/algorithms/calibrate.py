"""The calibration pass: run the float model on calibration batches and record, per planned site, what
its algorithm needs (:class:`~qcompile.algorithms.stats.SiteStatistics`): the input Hessian for GPTQ,
per-channel mean/max ``|x|`` and a subsample of input rows for AWQ and SmoothQuant.

Block by block, as GPTQ does, when the model has a list of blocks holding the planned sites (``model.layers`` …):

1. run the model once per batch up to the first block and keep that block's inputs;
2. for each block (:func:`calibrate_block`): run it with forward hooks on its planned sites (statistics); fold the
   AWQ / SmoothQuant scales of its sites into the float weights (:mod:`qcompile.algorithms.scaling`: producers
   found from the block's own forward, each fold checked to keep the block's function); recompute the Hessians
   if a scale changed a GPTQ site's inputs; let algorithms with a ``block_pass`` optimise their sites of the block
   jointly (AutoRound); quantize every planned site of the block (GPTQ and block-pass results are kept for
   the quantize stage) and run the block again with those weights to get the next block's inputs; put the float
   (scaled) weights back.

Peak memory is the float model plus one block's activations for all calibration batches. Later
blocks therefore calibrate on the outputs of already-quantized blocks. Planned sites outside the
blocks (an output head), and models without a block list, get statistics from one whole-model pass
on the float model. The pass leaves the model float, except for the scales folded by AWQ and
SmoothQuant (edits of the same function).

Padding: each batch's ``attention_mask`` is the current mask while the model or a block runs on that batch, and
every site's hook passes it to :meth:`SiteStatistics.add`, which drops the padding rows of ``[B, S, K]`` inputs.

Errors: a batch the model cannot take fails at once, as a :class:`CalibrationError` naming the batch (its index
and inputs) and the model's own error. An interrupted pass (``KeyboardInterrupt`` or any error) leaves the model
as it was: every tensor the pass edited is restored from the copy taken before its first edit (held until the
pass ends: the weights AWQ / SmoothQuant scale), hooks are removed, training mode and ``use_cache`` put back.
"""

from __future__ import annotations

import contextvars
import re
import warnings

import torch

from qcompile.algorithms import get_algorithm
from qcompile.algorithms.calibration_data import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, calibration_batches
from qcompile.algorithms.options import check_options, check_plan_options
from qcompile.algorithms.scaling import SCALING_ALGORITHMS, FoldGroup, Journal, is_linear
from qcompile.algorithms.site_scales import scale_sites
from qcompile.algorithms.stats import SiteStatistics
from qcompile.progress import progress

#: the ``attention_mask`` of the batch the model (or a block) is running on
_MASK: contextvars.ContextVar = contextvars.ContextVar("qcompile_calibration_mask", default=None)


class CalibrationError(ValueError):
    """A calibration batch the model (or one of its blocks) could not take."""


class _StopForward(Exception):
    pass


def _options(plan) -> dict:
    merged = dict(plan.recipe.options)
    for entry in plan.to_quantize():
        merged.update(dict(entry.options))
    return merged


def _find_blocks(model, names: list[str]):
    """``(path, ModuleList)`` of the module list whose items hold most of ``names``, or ``(None, None)``."""
    best, best_count = (None, None), 0
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 and not any(is_linear(m) for m in module):
            under = re.compile(rf"{re.escape(path)}\.\d+\.") if path else re.compile(r"\d+\.")
            count = sum(bool(under.match(n)) for n in names)
            if count > best_count:
                best, best_count = (path, module), count
    return best


def _hooks(modules: dict, stats: dict[str, SiteStatistics], names):
    """Pre-hooks adding each site's input to its statistics (an input of the wrong width is left to the layer,
    which fails with its own error)."""
    def add(name, x):
        if x.shape[-1] == stats[name].in_features:
            stats[name].add(x, _MASK.get())

    return [modules[n].register_forward_pre_hook(lambda _m, args, n=n: add(n, args[0])) for n in names]


def _call(run, mask, where: str):
    """``run()`` with ``mask`` current; errors other than :class:`_StopForward` say ``where`` (the batch)."""
    token = _MASK.set(mask)
    try:
        return run()
    except _StopForward:
        raise
    except Exception as error:
        raise CalibrationError(f"{where} raised {type(error).__name__}: {error}") from error
    finally:
        _MASK.reset(token)


def _call_model(model, index: int, batch):
    where = f"calibration batch {index} ({batch.describe()}): {type(model).__name__}"
    return _call(lambda: batch(model), batch.mask, where)


def _run_model(model, batches) -> None:
    for i, batch in enumerate(batches):
        try:
            _call_model(model, i, batch)
        except _StopForward:
            pass


def _block_inputs(model, block, batches) -> list[tuple[tuple, dict, torch.Tensor | None]]:
    """The ``(args, kwargs, mask)`` every batch brings to ``block`` (the forward stops there)."""
    captured = []

    def stop(_module, args, kwargs):
        captured.append((args, kwargs, _MASK.get()))
        raise _StopForward

    handle = block.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        _run_model(model, batches)
    finally:
        handle.remove()
    return captured


def _call_block(block, index: int, item):
    args, kwargs, mask = item
    return _call(lambda: block(*args, **kwargs), mask, f"calibration batch {index}: block {type(block).__name__}")


def _run_block(block, inputs) -> list[tuple[tuple, dict, torch.Tensor | None]]:
    outputs = []
    for i, item in enumerate(inputs):
        args, kwargs, mask = item
        out = _call_block(block, i, item)
        hidden = out[0] if isinstance(out, (tuple, list)) else out
        outputs.append(((hidden, *args[1:]), kwargs, mask) if args else ((), {**kwargs, "hidden_states": hidden},
                                                                        mask))  # fmt: skip
    return outputs


def _quantize_in_place(modules, entries, stats, names) -> dict[str, torch.Tensor]:
    """Replace the weights of ``names`` by their quantized values; returns the float originals (all put back when
    this fails half way)."""
    originals = {}
    try:
        for n in names:
            entry, weight = entries[n], modules[n].weight
            scheme, options = entry.parsed, dict(entry.options)
            w = (weight.detach().t() if entry.site.transposed else weight.detach()).to(torch.float32).contiguous()
            q = get_algorithm(entry.algorithm).run(scheme, w, stats.get(n), options)
            if entry.algorithm == "gptq":
                stats[n].remember(scheme, w, options, q)
            w_q = scheme.dequantize(q)
            divisor = getattr(stats.get(n), "input_divisor", None)
            if divisor is not None:  # the layer will compute (x / s) Q(W s)ᵀ = x (Q(W s) / s)ᵀ
                w_q = w_q / divisor.unsqueeze(0)
            originals[n] = weight.detach().clone()
            weight.data.copy_((w_q.t() if entry.site.transposed else w_q).to(weight.dtype))
    except BaseException:
        _put_back(modules, originals)
        raise
    return originals


def _put_back(modules, originals: dict[str, torch.Tensor]) -> None:
    for n, w in originals.items():
        modules[n].weight.data.copy_(w)


def collect_statistics(model, plan, calibration, progress_bar: bool = True) -> dict[str, SiteStatistics]:
    """``{site name: SiteStatistics}`` for every planned site whose algorithm needs calibration."""
    with torch.no_grad():
        stats, problems = _collect(model, plan, calibration, progress_bar)
    if problems:  # stacklevel: the caller of qcompile.quantize / qcompile.compile
        warnings.warn(
            "calibration: these sites keep unscaled weights (plain round to nearest):\n  " + "\n  ".join(problems),
            stacklevel=4,
        )
    return stats


def batches_and_statistics(model, plan, entries: dict, calibrating: list[str], calibration) -> tuple[list, dict]:
    """The calibration batches (the plan's ``samples`` / ``seq_len`` options) and an empty statistics record for each
    calibrating site (a Hessian for GPTQ, input rows for AWQ and for SmoothQuant's explicit scales). The recipe's
    options are checked first, before anything runs."""
    check_plan_options(plan)
    for name in calibrating:  # each algorithm's own check (unknown names), before any batch runs
        check_options(entries[name].algorithm, dict(entries[name].options))
    options = _options(plan)
    batches = calibration_batches(model, calibration, int(options.get("samples", DEFAULT_SAMPLES)),
                                  int(options.get("seq_len", DEFAULT_SEQ_LEN)))  # fmt: skip
    algorithms = {n: get_algorithm(entries[n].algorithm) for n in calibrating}
    stats = {
        n: SiteStatistics(n, entries[n].site.in_features, want_hessian=algorithms[n].wants_hessian,
                          want_inputs=algorithms[n].wants_inputs,
                          max_samples=int(dict(entries[n].options).get("max_samples", 512)))
        for n in calibrating
    }  # fmt: skip
    return batches, stats


def calibrate_block(block, prefix: str, inputs, modules, entries, stats, planned, journal=None) -> tuple[list, list]:
    """One block of the loop (module docstring, step 2): ``(next block's inputs, sites left unscaled and why)``;
    ``prefix``: the block's module path; the planned sites hold their float (scaled) weights afterwards."""
    if not planned:
        return _run_block(block, inputs), []
    names = [n for n in planned if n in stats]
    handles = _hooks(modules, stats, names)
    try:
        _run_block(block, inputs)
    finally:
        for h in handles:
            h.remove()
    problems = _rescale_and_recollect(modules, entries, stats, names, lambda: _run_block(block, inputs), block,
                                      prefix, lambda: _call_block(block, 0, inputs[0]), journal)  # fmt: skip
    _block_passes(block, prefix, inputs, modules, entries, stats, planned)
    originals = _quantize_in_place(modules, entries, stats, planned)
    try:
        return _run_block(block, inputs), problems
    finally:
        _put_back(modules, originals)


def _block_passes(block, prefix, inputs, modules, entries, stats, planned) -> None:
    """Algorithms with a ``block_pass`` (AutoRound) optimise their sites of the block jointly; results go to the
    sites' statistics, read back when :func:`_quantize_in_place` runs the algorithm on each site."""
    by_algorithm: dict[str, list[str]] = {}
    for n in planned:
        if n in stats:
            by_algorithm.setdefault(entries[n].algorithm, []).append(n)
    for algorithm, names in by_algorithm.items():
        run = get_algorithm(algorithm).block_pass
        if run is not None:
            run(block, prefix, inputs, {n: modules[n] for n in names}, {n: entries[n] for n in names}, stats)


def _unmasked_notes(stats) -> None:
    for s in stats.values():
        if s.unmasked:
            s.note = "; ".join(filter(None, [s.note, f"attention_mask not applied to {s.unmasked} input rows "
                                                      "that are no [B, S] tokens"]))  # fmt: skip


def _collect(model, plan, calibration, progress_bar):
    entries = {e.site.name: e for e in plan.to_quantize()}
    calibrating = [n for n, e in entries.items() if get_algorithm(e.algorithm).needs_calibration]
    batches, stats = batches_and_statistics(model, plan, entries, calibrating, calibration)
    modules = dict(model.named_modules())
    was_training, use_cache = model.training, getattr(getattr(model, "config", None), "use_cache", None)
    model.eval()
    if use_cache is not None:
        model.config.use_cache = False
    problems: list[str] = []
    journal = Journal()
    try:
        path, blocks = _find_blocks(model, calibrating)
        outside = [n for n in calibrating if path is None or not n.startswith(path + ".")]
        if outside:  # one float pass for the sites no block holds
            handles = _hooks(modules, stats, outside)
            try:
                _run_model(model, batches)
            finally:
                for h in handles:
                    h.remove()
            problems += _rescale_and_recollect(modules, entries, stats, outside, lambda: _run_model(model, batches),
                                               model, "", lambda: _call_model(model, 0, batches[0]),
                                               journal)  # fmt: skip
        if blocks is not None:
            inputs = _block_inputs(model, blocks[0], batches)
            for i in progress(range(len(blocks)), "calibrate", enabled=progress_bar, unit="block"):
                prefix = f"{path}.{i}"
                planned = [n for n in entries if n.startswith(prefix + ".")]
                inputs, found = calibrate_block(blocks[i], prefix, inputs, modules, entries, stats, planned, journal)
                problems += found
    except BaseException:
        journal.restore()
        raise
    finally:
        model.train(was_training)
        if use_cache is not None:
            model.config.use_cache = use_cache
    _unmasked_notes(stats)
    return stats, problems


def _rescale_and_recollect(modules, entries, stats, names, forward, root, prefix, forward_one,
                           journal=None) -> list[str]:  # fmt: skip
    """Fold scales for ``names``; when that changed any GPTQ site's inputs, collect its Hessian again."""
    scaled, problems = scale_sites(modules, entries, stats, names, root, prefix, forward_one, journal)
    gptq = [n for n in names if entries[n].algorithm == "gptq"]
    if scaled and gptq:
        for n in gptq:
            stats[n].reset()
        handles = _hooks(modules, stats, gptq)
        try:
            forward()
        finally:
            for h in handles:
                h.remove()
    return problems


__all__ = ["CalibrationError", "FoldGroup", "SCALING_ALGORITHMS", "batches_and_statistics", "calibrate_block",
           "collect_statistics"]  # fmt: skip
