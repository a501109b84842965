"""``torch.compile(model, backend="qcompile", options={"recipe": ...})``.

Registered through the ``torch_dynamo_backends`` entry point, so no ``import qcompile`` is needed.
Dynamo hands the backend a graph whose parameters are inputs; the backend turns the planned weights
into ``qcompile::linear`` calls with packed buffers and runs the rest of the graph as it is (or through
inductor with ``options={"inductor": True}``); op by op, a boolean attention mask is decided once per forward
(``passes/attention.py``: no mask, ``is_causal`` or one additive mask) instead of once per layer. Packed weights are cached per parameter (and its version),
so a recompilation (new shapes, a graph break) never quantizes the same weight twice. Pass
``dynamic=True`` to ``torch.compile`` for one compilation across batch sizes and sequence lengths.

Options: ``recipe`` (dict, path, Recipe or scheme name), ``inductor`` (bool), ``inline_kernels`` (bool, with
``inductor``: CUDA calls become the Triton launches of their kernels, which inductor compiles and launches itself;
default: the ``QCOMPILE_INLINE_KERNELS`` environment variable, else off), ``verbose`` (print the plan table),
``progress`` (bool).

A model that is quantized already (its graph calls ``qcompile::linear``) runs as it is: without a ``recipe`` option
the layers it kept float stay float.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import re
import warnings
import weakref

import torch
import torch._functorch.config  # noqa: F401 - torch._functorch.config is read below
import torch.fx as fx

_SOURCE_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_][A-Za-z_0-9]*)")
_OPTIONS = ("recipe", "inductor", "inline_kernels", "verbose", "progress")
# id(parameter) → (weak reference to it, {quantization key: packed}); tensors compare elementwise, so a
# WeakKeyDictionary cannot hold them
_PACKED_CACHE: dict[int, tuple[weakref.ref, dict]] = {}


def _source_path(name: str) -> str:
    """``L['self']._modules['model']._parameters['weight']`` → ``model.weight``."""
    rest = re.sub(r"^L\['[^']+'\](?:\[\d+\])?", "", name)
    parts = [a or b for a, b in _SOURCE_PART.findall(rest)]
    return ".".join(parts)


def _lift_parameters(gm: fx.GraphModule, example_inputs) -> list[int]:
    """Turn placeholders that are module parameters/buffers into ``get_attr`` nodes on ``gm``.

    Returns the indices of the inputs that remain graph inputs.
    """
    kept = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for index, node in enumerate(placeholders):
        grapharg = node.meta.get("grapharg")
        source = grapharg.source.name if grapharg is not None else ""
        value = example_inputs[index] if index < len(example_inputs) else None
        is_state = isinstance(value, torch.Tensor) and ("_parameters[" in source or "_buffers[" in source)
        if not is_state:
            kept.append(index)
            continue
        path = _source_path(source) or node.name
        owner_path, _, attr = path.rpartition(".")
        owner = gm
        for part in owner_path.split(".") if owner_path else []:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        if not hasattr(owner, attr):
            owner.register_buffer(attr, value, persistent=False)
        with gm.graph.inserting_before(node):
            attr_node = gm.graph.get_attr(path)
        attr_node.meta.update(node.meta)
        node.replace_all_uses_with(attr_node)
        gm.graph.erase_node(node)
    gm.recompile()
    return kept


def _cached_quantize(entry, weight):
    from qcompile.quantizer import quantize_entry

    key = (weight._version, entry.scheme, entry.algorithm, entry.options, entry.site.transposed)
    cached = _PACKED_CACHE.get(id(weight))
    if cached is None or cached[0]() is not weight:
        cached = (weakref.ref(weight), {})
        _PACKED_CACHE[id(weight)] = cached
        weakref.finalize(weight, _PACKED_CACHE.pop, id(weight), None)
    per_weight = cached[1]
    if key not in per_weight:
        per_weight.clear()
        per_weight[key] = quantize_entry(entry, weight)
    return per_weight[key]


class _Watched:
    """A quantized parameter and the version its packed copy was made from."""

    __slots__ = ("entry", "weight", "version")

    def __init__(self, entry, weight, version):
        self.entry, self.weight, self.version = entry, weight, version


def _refresh_changed_weights(gm: fx.GraphModule, watched: list, inductor: bool) -> None:
    """Parameters are read once, at compile time; one changed in place since (a training step, ``mul_``) is
    quantized again before this call, as stock backends would read its new value."""
    from qcompile.passes.lower import buffer_prefix, set_buffer

    for item in watched:
        if item.weight._version == item.version:
            continue
        if inductor:
            raise RuntimeError(
                f"qcompile backend: weight {item.entry.site.weight_name} changed after compilation, and the "
                "inductor-compiled graph holds its packed copy; call torch._dynamo.reset() and compile again"
            )
        warnings.warn(f"qcompile: {item.entry.site.name} changed after compilation; quantizing it again",
                      stacklevel=3)  # fmt: skip
        packed = _cached_quantize(item.entry, item.weight)
        prefix = buffer_prefix(item.entry.site)
        for key, tensor in packed.tensors().items():
            set_buffer(gm, f"{prefix}.{key}", tensor)
        item.version = item.weight._version


def _already_quantized(gm: fx.GraphModule) -> bool:
    """Does the graph call ``qcompile::linear`` already (a model ``qcompile.quantize`` or ``from_pretrained``
    quantized)?"""
    linear = torch.ops.qcompile.linear
    return any(n.op == "call_function" and (n.target is linear or n.target is linear.default) for n in gm.graph.nodes)


_ANNOUNCED: set[str] = set()


def _announce_default(plan) -> None:
    """Say once per process which plan a ``torch.compile`` without a ``recipe`` option applied."""
    key = plan.recipe.default or ""
    if key in _ANNOUNCED:
        return
    _ANNOUNCED.add(key)
    print(f"qcompile: torch.compile without a recipe option quantizes with the default recipe ({key}); pass "
          f"options={{'recipe': ...}} to choose. The plan (said once):\n{plan.table()}", file=sys.stderr)


def qcompile_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, **kwargs):
    """The Dynamo backend (see module docstring)."""
    from qcompile.passes.capture import _fetch, find_prequantized, find_sites, kept_sites
    from qcompile.passes.lower import lower
    from qcompile.plan import make_plan
    from qcompile.progress import progress

    options = dict(options or kwargs.get("config") or {})
    for key in options:
        if key not in _OPTIONS:
            raise ValueError(f"qcompile backend: unknown option {key!r}; known options: {', '.join(_OPTIONS)}")
    gm = fx.GraphModule(gm, copy.deepcopy(gm.graph))  # Dynamo keeps reading the graph it handed over
    kept = _lift_parameters(gm, example_inputs)
    matches = find_sites(gm)
    recipe = options.get("recipe")
    if recipe is None and _already_quantized(gm):
        recipe = {"default": None}  # the layers a quantized model kept float stay float
    prequantized = [(p.site, p.scheme) for p in find_prequantized(gm)]
    plan = make_plan(recipe, [m.site for m in matches], prequantized, kept_sites(gm, matches))
    if options.get("verbose"):
        print(plan.table())
    elif options.get("recipe") is None and plan.to_quantize():
        _announce_default(plan)
    packed, schemes, watched = {}, {}, []
    by_name = {m.site.name: m for m in matches}
    for entry in progress(plan.to_quantize(), "quantize", enabled=options.get("progress", False)):
        weight = _fetch(gm, by_name[entry.site.name].weight_node.target)
        packed[entry.site.name] = _cached_quantize(entry, weight)
        schemes[entry.site.name] = entry.scheme
        watched.append(_Watched(entry, weight, weight._version))
    lower(gm, matches, packed, schemes)
    gm.qcompile_plan = plan
    inputs = [example_inputs[i] for i in kept]
    if options.get("inductor"):
        from torch._inductor.compile_fx import compile_fx

        from qcompile.runtime.dispatch import inline_kernels, inlining

        inline = bool(options.get("inline_kernels", inlining()))
        # AOTAutograd's cache keys the graph before functionalization: it cannot tell an inlined compile from an
        # opaque one (nor see the kernels' sources), so it stays out of inlined compiles
        no_cache = torch._functorch.config.patch(enable_autograd_cache=False) if inline else contextlib.nullcontext()
        with inline_kernels(inline), no_cache:
            compiled = compile_fx(gm, inputs)
    else:
        from qcompile.passes.attention import share_attention_masks

        share_attention_masks(gm)
        compiled = gm.forward

    def run(*args):
        _refresh_changed_weights(gm, watched, inductor=bool(options.get("inductor")))
        return compiled(*[args[i] for i in kept])

    run.qcompile_plan = plan
    return run
