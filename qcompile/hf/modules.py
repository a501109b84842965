"""The plug-in's module surgery on a model built on the meta device: plan its linear sites, put meta
:class:`~qcompile.nn.QuantizedLinear` modules in their place, and the plan as config.json stores it."""

from __future__ import annotations

import torch

from qcompile.eager import _set_module, linear_sites
from qcompile.nn import QuantizedLinear
from qcompile.plan import Plan, PlanEntry, Site
from qcompile.recipe import Recipe
from qcompile.schemes import PackedWeight, parse_scheme

#: the float weight a planned module holds while loading, until its checkpoint tensor arrives and is quantized
PLACEHOLDER = "weight"


def plan_data(plan: Plan) -> dict[str, dict]:
    """``{site: {"scheme", "in_features", "out_features"}}`` for the quantized sites of ``plan``."""
    return {e.site.name: {"scheme": e.scheme, "in_features": e.site.in_features,
                          "out_features": e.site.out_features} for e in plan.quantized()}  # fmt: skip


def meta_packed(scheme: str, out_features: int, in_features: int) -> PackedWeight:
    """The scheme's declared tensors for an ``[N, K]`` weight, on the meta device."""
    specs = parse_scheme(scheme).tensors(out_features, in_features)
    return PackedWeight({s.name: torch.empty(s.shape, dtype=s.dtype, device="meta") for s in specs})


def tied_weights(model) -> set[str]:
    """Every parameter name transformers ties to another (both sides)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return set(tied) | set(tied.values())


def put_meta_modules(model, plan: Plan, modules: dict[str, torch.nn.Module], placeholder: bool) -> None:
    """Replace every quantized site of ``plan`` by a meta ``QuantizedLinear`` (bias kept as the model has it).

    ``placeholder``: the module also holds a meta float ``weight`` shaped as the checkpoint stores it, so the loader
    expects that tensor and hands it to the quantize-on-load operation, which then removes it."""
    for entry in plan.quantized():
        site, old = entry.site, modules[entry.site.name]
        new = QuantizedLinear(site.in_features, site.out_features, entry.scheme,
                              meta_packed(entry.scheme, site.out_features, site.in_features), old.bias)  # fmt: skip
        if placeholder:
            weight = torch.nn.Parameter(torch.empty_like(old.weight, device="meta"), requires_grad=False)
            new.register_parameter(PLACEHOLDER, weight)
        _set_module(model, site.name, new)
        _skip_parent_init(model, site.name)


def _skip_parent_init(model, name: str) -> None:
    """Mark the parent of a quantized layer as initialized when it holds no tensor of its own: some models'
    ``_init_weights`` (GPT-2's attention and MLP blocks) re-initialize a child's ``.weight`` through the parent,
    which a ``QuantizedLinear`` does not have, and the parent has nothing else that needs initializing."""
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    if parent is not model and not any(True for _ in parent.parameters(recurse=False)) and not any(
            True for _ in parent.buffers(recurse=False)):  # fmt: skip
        parent._is_hf_initialized = True


def saved_plan(model, data: dict[str, dict], recipe: Recipe) -> tuple[Plan, dict[str, torch.nn.Module]]:
    """The plan a saved config records, checked against ``model``'s linear layers (names and shapes)."""
    found = {site.name: (site, module) for site, module in linear_sites(model)}
    entries, modules = [], {}
    for name, item in data.items():
        if name not in found:
            close = ", ".join(list(found)[:3])
            raise ValueError(f"quantization_config.plan names {name}, which is not a linear layer of "
                             f"{type(model).__name__} (its linear layers look like {close})")  # fmt: skip
        site, module = found[name]
        want, got = (item["out_features"], item["in_features"]), (site.out_features, site.in_features)
        if want != got:
            raise ValueError(f"quantization_config.plan: {name} is [N={want[0]}, K={want[1]}] in the checkpoint, "
                             f"[N={got[0]}, K={got[1]}] in the model")  # fmt: skip
        entries.append(PlanEntry(site, item["scheme"], reason="checkpoint"))
        modules[name] = module
    return Plan(recipe, tuple(entries)), modules


def dequantize_modules(model, dtype: torch.dtype | None) -> None:
    """Replace every ``QuantizedLinear`` by an ``nn.Linear`` holding its dequantized weight."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantizedLinear):
            continue
        weight = module.dequantized_weight()
        bias = module.bias
        target = dtype or (bias.dtype if bias is not None else torch.get_default_dtype())
        linear = torch.nn.Linear(module.in_features, module.out_features, bias=bias is not None,
                                 device=weight.device, dtype=target)  # fmt: skip
        with torch.no_grad():
            linear.weight.copy_(weight.to(target))
            if bias is not None:
                linear.bias.copy_(bias)
        _set_module(model, name, linear)


def site_list(model) -> tuple[list[Site], dict[str, torch.nn.Module]]:
    sites = linear_sites(model)
    return [s for s, _ in sites], {s.name: m for s, m in sites}
