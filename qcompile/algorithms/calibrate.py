"""The calibration pass: run the float model on calibration tokens and record, per planned site, what
its algorithm needs (:class:`~qcompile.algorithms.stats.SiteStatistics`): the input Hessian for GPTQ,
per-channel mean/max ``|x|`` and a subsample of input rows for AWQ and SmoothQuant.

Block by block, as GPTQ does, when the model has a list of decoder blocks (``model.layers`` …):

1. run the model once per batch up to the first block and keep that block's inputs;
2. for each block: run it with forward hooks on its planned sites (statistics); fold the AWQ /
   SmoothQuant scales of its sites into the float weights; recompute the Hessians if a scale
   changed a GPTQ site's inputs; quantize every planned site of the block (GPTQ results are kept for
   the quantize stage) and run the block again with those weights to get the next block's inputs;
   put the float (scaled) weights back.

Peak memory is the float model plus one block's activations for all calibration batches. Later
blocks therefore calibrate on the outputs of already-quantized blocks. Planned sites outside the
blocks (an output head), and models without a block list, get statistics from one whole-model pass
on the float model. The pass leaves the model float, except for the scales folded by AWQ and
SmoothQuant (edits of the same function).
"""

from __future__ import annotations

import warnings

import torch

from qcompile.algorithms import get_algorithm
from qcompile.algorithms.calibration_data import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, calibration_batches
from qcompile.algorithms.scaling import SCALING_ALGORITHMS, fold_groups, fold_scale, why_not_foldable
from qcompile.algorithms.stats import SiteStatistics
from qcompile.progress import progress


class _StopForward(Exception):
    pass


def _options(plan) -> dict:
    merged = dict(plan.recipe.options)
    for entry in plan.to_quantize():
        merged.update(dict(entry.options))
    return merged


def _find_blocks(model, names: list[str]):
    """``(path, ModuleList)`` of the module list that holds most of ``names``, or ``(None, None)``."""
    best, best_count = (None, None), 0
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            count = sum(n.startswith(path + ".") for n in names)
            if count > best_count:
                best, best_count = (path, module), count
    return best


def _hooks(modules: dict, stats: dict[str, SiteStatistics], names):
    return [modules[n].register_forward_pre_hook(lambda _m, args, n=n: stats[n].add(args[0])) for n in names]


def _run_model(model, batches) -> None:
    for ids in batches:
        try:
            model(input_ids=ids)
        except _StopForward:
            pass


def _block_inputs(model, block, batches) -> list[tuple[tuple, dict]]:
    """The ``(args, kwargs)`` every batch brings to ``block`` (the forward stops there)."""
    captured = []

    def stop(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = block.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        _run_model(model, batches)
    finally:
        handle.remove()
    return captured


def _run_block(block, inputs) -> list[tuple[tuple, dict]]:
    outputs = []
    for args, kwargs in inputs:
        out = block(*args, **kwargs)
        hidden = out[0] if isinstance(out, (tuple, list)) else out
        outputs.append(((hidden, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": hidden}))
    return outputs


def _scale_sites(modules, entries, stats, names) -> tuple[set[str], list[str]]:
    """Fold AWQ / SmoothQuant scales for ``names``; ``(sites scaled, warnings)``."""
    from qcompile.algorithms.awq import search_scale
    from qcompile.algorithms.smoothquant import smoothing_scale

    wanted = [n for n in names if n in entries and entries[n].algorithm in SCALING_ALGORITHMS]
    scaled, problems = set(), []
    for group in fold_groups(modules, wanted):
        members = [m for m in group.members if m in wanted]
        algorithms = {entries[m].algorithm for m in members}
        reason = why_not_foldable(modules, group)
        if reason is None and len(algorithms) > 1:
            reason = f"its linears ask for different algorithms ({', '.join(sorted(algorithms))})"
        if reason is not None:
            problems += [f"{m}: {reason}" for m in members]
            continue
        first = stats[members[0]]
        weights = [modules[m].weight.detach().to(torch.float32) for m in members]
        if algorithms == {"awq"}:
            grid = int(dict(entries[members[0]].options).get("grid", 20))
            scale, alpha, _ = search_scale(weights, [entries[m].parsed for m in members], first.inputs,
                                           first.abs_mean, grid)  # fmt: skip
            note = f"AWQ scale α={alpha:.2f} folded into {group.producer}"
        else:
            alpha = float(dict(entries[members[0]].options).get("alpha", 0.5))
            all_weights = [modules[m].weight.detach().to(torch.float32) for m in group.members]
            scale = smoothing_scale(all_weights, first.abs_max, alpha)
            note = f"SmoothQuant α={alpha:.2f} folded into {group.producer}"
        fold_scale(modules, group, scale)
        for m in members:
            stats[m].scale, stats[m].note = scale, note
            scaled.add(m)
    for n in wanted:
        if n not in scaled and not any(p.startswith(n + ":") for p in problems):
            problems.append(f"{n}: no norm or linear before it to fold a scale into")
    for n in wanted:
        if n not in scaled:
            stats[n].note = "unscaled (round to nearest)"
    return scaled, problems


def _quantize_in_place(modules, entries, stats, names) -> dict[str, torch.Tensor]:
    """Replace the weights of ``names`` by their quantized values; returns the float originals."""
    originals = {}
    for n in names:
        entry, weight = entries[n], modules[n].weight
        scheme, options = entry.parsed, dict(entry.options)
        w = (weight.detach().t() if entry.site.transposed else weight.detach()).to(torch.float32).contiguous()
        q = get_algorithm(entry.algorithm).run(scheme, w, stats.get(n), options)
        if entry.algorithm == "gptq":
            stats[n].remember(scheme, w, options, q)
        w_q = scheme.dequantize(q)
        originals[n] = weight.detach().clone()
        weight.data.copy_((w_q.t() if entry.site.transposed else w_q).to(weight.dtype))
    return originals


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
    calibrating site (a Hessian for GPTQ, input rows for AWQ)."""
    options = _options(plan)
    batches = calibration_batches(model, calibration, int(options.get("samples", DEFAULT_SAMPLES)),
                                  int(options.get("seq_len", DEFAULT_SEQ_LEN)))  # fmt: skip
    stats = {
        n: SiteStatistics(n, entries[n].site.in_features, want_hessian=entries[n].algorithm == "gptq",
                          want_inputs=entries[n].algorithm == "awq",
                          max_samples=int(dict(entries[n].options).get("max_samples", 512)))
        for n in calibrating
    }  # fmt: skip
    return batches, stats


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
            problems += _rescale_and_recollect(modules, entries, stats, outside, lambda: _run_model(model, batches))
        if blocks is not None:
            inputs = _block_inputs(model, blocks[0], batches)
            for i in progress(range(len(blocks)), "calibrate", enabled=progress_bar, unit="block"):
                prefix = f"{path}.{i}."
                planned = [n for n in entries if n.startswith(prefix)]
                if not planned:
                    inputs = _run_block(blocks[i], inputs)
                    continue
                names = [n for n in planned if n in stats]
                handles = _hooks(modules, stats, names)
                try:
                    _run_block(blocks[i], inputs)
                finally:
                    for h in handles:
                        h.remove()
                block_inputs = inputs
                problems += _rescale_and_recollect(modules, entries, stats, names,
                                                   lambda: _run_block(blocks[i], block_inputs))  # fmt: skip
                originals = _quantize_in_place(modules, entries, stats, planned)
                inputs = _run_block(blocks[i], inputs)
                for n, w in originals.items():
                    modules[n].weight.data.copy_(w)
    finally:
        model.train(was_training)
        if use_cache is not None:
            model.config.use_cache = use_cache
    return stats, problems


def _rescale_and_recollect(modules, entries, stats, names, forward) -> list[str]:
    """Fold scales for ``names``; when that changed any GPTQ site's inputs, collect its Hessian again."""
    scaled, problems = _scale_sites(modules, entries, stats, names)
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
