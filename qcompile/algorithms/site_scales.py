"""Which AWQ / SmoothQuant site gets which scale (:func:`scale_sites`, one block or the whole model at a time):

1. the fold groups of the sites, from the model's own forward (:func:`qcompile.algorithms.scaling.traced_groups`),
   then :data:`qcompile.algorithms.scaling.FOLDS` for sites no module output feeds;
2. each group whose shapes allow it (:func:`~qcompile.algorithms.scaling.why_not_foldable`), whose sites ask for one
   algorithm and whose fold keeps the function (:func:`~qcompile.algorithms.scaling.probe_group`) gets the scale of
   its algorithm (AWQ's search over the group's AWQ sites, SmoothQuant's formula over all its linears) folded in;
3. every other site keeps its weights (round to nearest) and is reported with the reason, or, with the option
   ``explicit_scales``, gets its own scale as an explicit input scale (``SiteStatistics.input_divisor``).

``SiteStatistics.note`` says which, for the plan table.
"""

from __future__ import annotations

import torch

from qcompile.algorithms.scaling import (
    SCALING_ALGORITHMS, fold_groups, fold_scale, output_tensors, probe_group, traced_groups, why_not_foldable,
)  # fmt: skip


def _weight_nk(module) -> torch.Tensor:
    """A linear's weight as ``float32 [N, K]`` (a ``Conv1D`` stores ``[K, N]``)."""
    weight = module.weight.detach()
    return (weight.t() if type(module).__name__ == "Conv1D" else weight).to(torch.float32)


def _scale(kind: str, entries, stats, members, all_members, modules) -> tuple[torch.Tensor, float, str]:
    """``(s, α, label)`` for linears ``members`` (AWQ's searched scale or SmoothQuant's formula)."""
    from qcompile.algorithms.awq import search_scale
    from qcompile.algorithms.smoothquant import smoothing_scale

    first = stats[members[0]]
    options = dict(entries[members[0]].options)
    if kind == "awq":
        weights = [_weight_nk(modules[m]) for m in members]
        scale, alpha, _ = search_scale(weights, [entries[m].parsed for m in members], first.inputs, first.abs_mean,
                                       int(options.get("grid", 20)))  # fmt: skip
        return scale, alpha, "AWQ"
    alpha = float(options.get("alpha", 0.5))
    weights = [_weight_nk(modules[m]) for m in all_members]
    return smoothing_scale(weights, first.abs_max, alpha), alpha, "SmoothQuant"


def scale_sites(modules, entries, stats, names, root, prefix, forward_one, journal=None) -> tuple[set, list[str]]:
    """Fold AWQ / SmoothQuant scales for ``names`` (sites under ``root``, whose forward on one batch is
    ``forward_one``); ``(sites scaled, warnings)``."""
    wanted = [n for n in names if n in entries and entries[n].algorithm in SCALING_ALGORITHMS]
    if not wanted:
        return set(), []
    groups, reasons = traced_groups(root, prefix, forward_one, wanted)
    covered = {m for g in groups for m in g.members}
    groups += [g for g in fold_groups(modules, [n for n in wanted if n not in covered])
               if not covered & set(g.members)]  # fmt: skip
    reference = output_tensors(forward_one())
    scaled, problems = set(), {}
    for group in groups:
        members = [m for m in group.members if m in wanted]
        if not members or any(m in scaled for m in members):
            continue
        algorithms = {entries[m].algorithm for m in members}
        reason = why_not_foldable(modules, group)
        if reason is None and any(stats[m].tokens == 0 for m in members):
            reason = "it saw no calibration input"
        if reason is None and len(algorithms) > 1:
            reason = f"its linears ask for different algorithms ({', '.join(sorted(algorithms))})"
        if reason is None and not reference:
            reason = "the model's output has no float tensor to check a fold against"
        if reason is None:
            reason = probe_group(modules, group, forward_one, reference)
        if reason is not None:
            problems.update({m: reason for m in members})
            continue
        scale, alpha, label = _scale(algorithms.pop(), entries, stats, members, group.members, modules)
        fold_scale(modules, group, scale, journal)
        for m in members:
            stats[m].scale, stats[m].note = scale, f"{label} α={alpha:.2f} folded into {group.producer}"
            scaled.add(m)
    for n in wanted:
        if n not in scaled and n not in problems:
            problems[n] = reasons.get(n, "no norm or linear before it to fold a scale into")
    out = []
    for n, reason in problems.items():
        if not _explicit_scale(modules, entries, stats, n, reason):
            stats[n].note = f"unscaled (round to nearest): {reason}"
            out.append(f"{n}: {reason} (the option explicit_scales: true keeps its scale at run time instead)")
    return scaled, out


def _explicit_scale(modules, entries, stats, name: str, reason: str) -> bool:
    """With the option ``explicit_scales``: the site's scale as an explicit input scale (``stats.input_divisor``;
    the weight is left as it is, the quantize stage quantizes ``W · s``). ``True`` when the site is handled."""
    entry = entries[name]
    if not dict(entry.options).get("explicit_scales") or stats[name].tokens == 0:
        return False
    scale, alpha, label = _scale(entry.algorithm, entries, stats, [name], [name], modules)
    if label == "AWQ" and alpha == 0:
        stats[name].note = f"AWQ search kept s = 1 (round to nearest); no fold: {reason}"
        return True
    scale = scale.to(modules[name].weight.dtype).to(torch.float32)  # as the layer's activations will hold it
    stats[name].scale = stats[name].input_divisor = scale
    stats[name].note = f"{label} α={alpha:.2f} as an explicit input scale (x / s at run time); no fold: {reason}"
    return True
