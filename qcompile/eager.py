"""Eager quantization: find ``nn.Linear`` / ``Conv1D`` modules and swap in :class:`QuantizedLinear`."""

from __future__ import annotations

import torch

from qcompile.nn import QuantizedLinear
from qcompile.plan import Plan, Site
from qcompile.progress import progress
from qcompile.quantizer import quantize_entry

HEAD_NAMES = ("lm_head", "embed_out", "output")


def _is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def linear_sites(model: torch.nn.Module) -> list[tuple[Site, torch.nn.Module]]:
    """``(Site, module)`` for every linear-like module, in ``named_modules`` order."""
    owners: dict[int, list[tuple[str, torch.nn.Module]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((name, module))
    out, seen = [], set()
    for name, module in model.named_modules():
        if not (isinstance(module, torch.nn.Linear) or _is_conv1d(module)) or name in seen:
            continue
        seen.add(name)
        weight = module.weight
        transposed = _is_conv1d(module)
        n, k = weight.shape[::-1] if transposed else weight.shape
        others = [o for o, m in owners.get(id(weight), []) if o != name and not isinstance(m, torch.nn.Linear)]
        site = Site(
            name=name,
            weight_name=f"{name}.weight",
            out_features=int(n),
            in_features=int(k),
            kind="conv1d" if transposed else "linear",
            transposed=transposed,
            has_bias=module.bias is not None,
            tied_to=tuple(sorted(set(others))),
            head=name.split(".")[-1] in HEAD_NAMES,
            weight_dtype=str(weight.dtype).replace("torch.", ""),
            weight_bytes=weight.numel() * weight.element_size(),
        )
        out.append((site, module))
    return out


def _set_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def swap_modules(model, plan: Plan, modules: dict, stats=None, progress_bar=True) -> int:
    """Replace every planned module by a :class:`QuantizedLinear`; shared weights are packed once."""
    by_site = {site.name: module for site, module in modules.items()}
    packed_by_weight: dict[tuple, object] = {}
    swapped = 0
    for entry in progress(plan.quantized(), "quantize", enabled=progress_bar):
        module = by_site[entry.site.name]
        key = (id(module.weight), entry.scheme, entry.algorithm, entry.options)
        if key not in packed_by_weight:
            site_stats = None if stats is None else stats.get(entry.site.name)
            packed_by_weight[key] = quantize_entry(entry, module.weight, site_stats)
        new = QuantizedLinear(entry.site.in_features, entry.site.out_features, entry.scheme,
                              packed_by_weight[key], module.bias)  # fmt: skip
        _set_module(model, entry.site.name, new)
        swapped += 1
    return swapped
