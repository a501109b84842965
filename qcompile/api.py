"""Public entry points: :func:`quantize` (eager, in place) and :func:`compile` (the export path)."""

from __future__ import annotations

import time
import warnings

import torch

from qcompile import eager
from qcompile.passes.capture import _fetch, capture, find_prequantized, find_sites, kept_sites, unsupported_sites
from qcompile.passes.lower import lower
from qcompile.plan import Plan, make_plan
from qcompile.progress import progress
from qcompile.quantizer import quantize_entry
from qcompile.calibration import statistics_for


def quantize(model: torch.nn.Module, recipe=None, calibration=None, *, progress_bar: bool = True,
             verbose: bool = False) -> torch.nn.Module:  # fmt: skip
    """Quantize ``model`` in place: every ``nn.Linear`` / GPT-2 ``Conv1D`` the recipe plans becomes a
    :class:`qcompile.nn.QuantizedLinear`. Returns ``model``; its plan is ``model.qcompile_plan``. Layers that are
    quantized already stay as they are (the plan marks them pre-quantized)."""
    sites = eager.linear_sites(model)
    plan = make_plan(recipe, [s for s, _ in sites], eager.prequantized_sites(model), eager.kept_sites(model))
    if verbose:
        print(plan.table())
    stats = statistics_for(model, plan, calibration)
    eager.swap_modules(model, plan, dict(sites), stats, progress_bar=progress_bar)
    model.qcompile_plan = plan
    return model


class QuantizedProgram(torch.nn.Module):
    """A lowered graph module plus what it was built from: the plan and the capture inputs."""

    def __init__(self, module: torch.fx.GraphModule, plan: Plan, example_args=(), example_kwargs=None,
                 dynamic_shapes=None, timings: dict | None = None):  # fmt: skip
        super().__init__()
        self.module = module
        self.plan = plan
        self.example_args = example_args
        self.example_kwargs = example_kwargs or {}
        self.dynamic_shapes = dynamic_shapes
        self.timings = timings or {}

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def compile(model: torch.nn.Module, example_args=(), recipe=None, *, example_kwargs=None, dynamic_shapes=None,
            calibration=None, progress_bar: bool = True, verbose: bool = False) -> QuantizedProgram:  # fmt: skip
    """Capture ``model`` with ``torch.export``, plan, quantize and lower it; returns a callable
    :class:`QuantizedProgram` that takes the same inputs as ``model`` (batch and sequence may vary).
    A model quantized already (:func:`quantize`, ``from_pretrained``) keeps its quantized layers as they are: the
    plan marks them pre-quantized and the recipe applies to its float layers only.

    ``model`` itself keeps its float weights. Recipes using ``awq`` or ``smoothquant`` fold equivalent
    per-channel scales into ``model``'s float weights first (its outputs are unchanged up to rounding)."""
    was_training = model.training
    model.eval()
    try:
        return _compile(model, example_args, recipe, example_kwargs, dynamic_shapes, calibration, progress_bar,
                        verbose)  # fmt: skip
    finally:
        model.train(was_training)


def _compile(model, example_args, recipe, example_kwargs, dynamic_shapes, calibration, progress_bar, verbose):
    timings = {}
    start = time.perf_counter()
    exported = capture(model, example_args, example_kwargs, dynamic_shapes)
    timings["capture_s"] = time.perf_counter() - start
    gm = exported.module()
    matches = find_sites(gm)
    skipped = unsupported_sites(gm, matches)
    if skipped:
        warnings.warn(f"qcompile: {len(skipped)} matmul(s) with a constant weight stay float (not a supported site): "
                      + "; ".join(skipped), stacklevel=2)  # fmt: skip
    plan = make_plan(recipe, [m.site for m in matches], [(p.site, p.scheme) for p in find_prequantized(gm)],
                     kept_sites(gm, matches))  # fmt: skip
    if verbose:
        print(plan.table())
    stats = statistics_for(model, plan, calibration)
    start = time.perf_counter()
    packed, schemes = {}, {}
    by_name = {m.site.name: m for m in matches}
    for entry in progress(plan.to_quantize(), "quantize", enabled=progress_bar):
        weight = _fetch(gm, by_name[entry.site.name].weight_node.target)
        packed[entry.site.name] = quantize_entry(entry, weight, None if stats is None else stats.get(entry.site.name))
        schemes[entry.site.name] = entry.scheme
    timings["quantize_s"] = time.perf_counter() - start
    start = time.perf_counter()
    lower(gm, matches, packed, schemes)
    timings["lower_s"] = time.perf_counter() - start
    return QuantizedProgram(gm, plan, example_args, example_kwargs, dynamic_shapes, timings)
