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
from qcompile.calibration import annotated, statistics_for


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
    plan = annotated(plan, stats)
    eager.swap_modules(model, plan, dict(sites), stats, progress_bar=progress_bar)
    model.qcompile_plan = plan
    return model


class QuantizedProgram(torch.nn.Module):
    """A lowered graph module plus what it was built from: the plan and the capture inputs.

    A language-model program (``language_model`` set: a causal LM exported as a step over a KV cache, see
    :mod:`qcompile.lm`) is called like the model, ``program(input_ids=..., attention_mask=...)`` → ``.logits``,
    and has :meth:`generate`.
    """

    language_model = None  # qcompile.lm.LanguageModelInfo of a step program

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
        if self.language_model is None or "past_keys" in kwargs:
            return self.module(*args, **kwargs)
        from qcompile.lm import sequence_logits

        ids = kwargs.pop("input_ids", args[0] if args else None)
        mask = kwargs.pop("attention_mask", args[1] if len(args) > 1 else None)
        kwargs.pop("use_cache", None)
        if ids is None or kwargs:
            raise TypeError(f"a language-model program takes input_ids and attention_mask; got "
                            f"{sorted(kwargs) or 'no input_ids'}")  # fmt: skip
        return sequence_logits(self.module, self.language_model, ids, mask)

    def generate(self, input_ids, attention_mask=None, **options) -> torch.Tensor:
        """Token ids ``[B, T + new]`` (see :func:`qcompile.lm.generate` for ``max_new_tokens``, ``do_sample``,
        ``temperature``, ``top_k``, ``top_p``, ``eos_token_id``, ``generator``)."""
        if self.language_model is None:
            raise TypeError("this program is no language-model step program: export a causal LM with "
                            "qcompile.export to get one")  # fmt: skip
        from qcompile.lm import generate

        return generate(self.module, self.language_model, input_ids, attention_mask, **options)


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
    plan = annotated(plan, stats)
    start = time.perf_counter()
    packed, schemes = {}, {}
    by_name = {m.site.name: m for m in matches}
    for entry in progress(plan.to_quantize(), "quantize", enabled=progress_bar):
        weight = _fetch(gm, by_name[entry.site.name].weight_node.target)
        packed[entry.site.name] = quantize_entry(entry, weight, None if stats is None else stats.get(entry.site.name))
        schemes[entry.site.name] = entry.scheme
    timings["quantize_s"] = time.perf_counter() - start
    start = time.perf_counter()
    divisors = {n: s.input_divisor for n, s in (stats or {}).items() if s.input_divisor is not None}
    lower(gm, matches, packed, schemes, divisors)
    timings["lower_s"] = time.perf_counter() - start
    return QuantizedProgram(gm, plan, example_args, example_kwargs, dynamic_shapes, timings)
