"""Eager quantization: find ``nn.Linear`` / ``Conv1D`` modules and swap in :class:`QuantizedLinear`."""

from __future__ import annotations

import warnings

import torch

from qcompile.nn import InputScaledLinear, QuantizedLinear
from qcompile.plan import HEAD_NAMES, Plan, Site
from qcompile.progress import progress
from qcompile.quantizer import quantize_entry

WEIGHT_READING_PARENTS = (
    torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer,
)  # fmt: skip


def _is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def _read_by_parent(name: str, module, parents: dict) -> str | None:
    """Why a linear module cannot be swapped: its parent reads ``.weight`` directly (``nn.MultiheadAttention``
    passes ``out_proj.weight`` to ``F.multi_head_attention_forward``; ``nn.TransformerEncoderLayer`` inspects
    ``linear1.weight`` to pick its fast path)."""
    parent = parents.get(name)
    if type(module).__name__ == "NonDynamicallyQuantizableLinear" or isinstance(parent, WEIGHT_READING_PARENTS):
        kind = type(parent).__name__ if parent is not None else "MultiheadAttention"
        return f"its {kind} parent reads the float weight; qcompile.compile quantizes it"
    return None


def linear_sites(model: torch.nn.Module) -> list[tuple[Site, torch.nn.Module]]:
    """``(Site, module)`` for every linear-like module, in ``named_modules`` order. Modules that cannot be
    swapped in eager mode are left float with a warning naming them."""
    owners: dict[int, list[tuple[str, torch.nn.Module]]] = {}
    parents: dict[str, torch.nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for _, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((name, module))
        for child_name, _ in module.named_children():
            parents[f"{name}.{child_name}" if name else child_name] = module
    out, seen, skipped = [], set(), []
    for name, module in model.named_modules():
        if not (isinstance(module, torch.nn.Linear) or _is_conv1d(module)) or name in seen:
            continue
        seen.add(name)
        reason = _read_by_parent(name, module, parents)
        if reason:
            skipped.append(f"{name} ({reason})")
            continue
        weight = module.weight
        transposed = _is_conv1d(module)
        others = [o for o, m in owners.get(id(weight), []) if o != name and not isinstance(m, torch.nn.Linear)]
        site = Site.for_weight(name, f"{name}.weight", weight, transposed=transposed,
                               kind="conv1d" if transposed else "linear", has_bias=module.bias is not None,
                               tied_to=tuple(sorted(set(others))))  # fmt: skip
        out.append((site, module))
    if skipped:
        warnings.warn("qcompile.quantize keeps these layers float: " + "; ".join(skipped), stacklevel=3)
    return out


#: weight-holding layers that are not matmuls qcompile quantizes, and why they stay float
KEPT_LAYERS = (
    ((torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d,
      torch.nn.ConvTranspose3d), "kept float: convolution (qcompile quantizes linear and matmul layers)"),
    ((torch.nn.Embedding, torch.nn.EmbeddingBag), "kept float: embedding (a table lookup, not a matmul)"),
)  # fmt: skip


def kept_sites(model: torch.nn.Module) -> list[tuple[Site, str]]:
    """``(Site, reason)`` for every convolution and embedding, so the plan lists them as kept float (an embedding
    tied to a linear head is that head's site already)."""
    matmul_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear) or _is_conv1d(m)}
    out = []
    for name, module in model.named_modules():
        for types, reason in KEPT_LAYERS:
            weight = getattr(module, "weight", None)
            if isinstance(module, types) and isinstance(weight, torch.Tensor) and id(weight) not in matmul_weights:
                kind = type(module).__name__.lower()
                n, k = weight.shape[0], weight[0].numel()
                site = Site(name=name, weight_name=f"{name}.weight", out_features=int(n), in_features=int(k),
                            kind=kind, weight_dtype=str(weight.dtype).removeprefix("torch."),
                            weight_bytes=weight.numel() * weight.element_size())  # fmt: skip
                out.append((site, reason))
    return out


def prequantized_sites(model: torch.nn.Module) -> list[tuple[Site, str]]:
    """``(Site, scheme)`` for every :class:`QuantizedLinear` the model holds already (weight bytes counted in its
    bias's dtype, else float32: what the float layer would hold)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            dtype = module.bias.dtype if module.bias is not None else torch.float32
            site = Site(name=name, weight_name=f"{name}.weight", out_features=module.out_features,
                        in_features=module.in_features, kind="qcompile.linear", has_bias=module.bias is not None,
                        head=name.split(".")[-1] in HEAD_NAMES, weight_dtype=str(dtype).removeprefix("torch."),
                        weight_bytes=module.out_features * module.in_features * dtype.itemsize)  # fmt: skip
            out.append((site, module.scheme))
    return out


def _set_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    """Replace the module at ``name`` and at every other path that holds the same module object."""
    old = model.get_submodule(name)
    paths = [path for path, module in model.named_modules(remove_duplicate=False) if module is old] or [name]
    for path in paths:
        parent_name, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)


def swap_modules(model, plan: Plan, modules: dict, stats=None, progress_bar=True) -> int:
    """Replace every planned module by a :class:`QuantizedLinear`; shared weights are packed once."""
    by_site = {site.name: module for site, module in modules.items()}
    packed_by_weight: dict[tuple, object] = {}
    swapped = 0
    for entry in progress(plan.to_quantize(), "quantize", enabled=progress_bar):
        module = by_site[entry.site.name]
        key = (id(module.weight), entry.scheme, entry.algorithm, entry.options)
        if key not in packed_by_weight:
            site_stats = None if stats is None else stats.get(entry.site.name)
            packed_by_weight[key] = quantize_entry(entry, module.weight, site_stats)
        divisor = getattr(None if stats is None else stats.get(entry.site.name), "input_divisor", None)
        if divisor is None:
            new = QuantizedLinear(entry.site.in_features, entry.site.out_features, entry.scheme,
                                  packed_by_weight[key], module.bias)  # fmt: skip
        else:  # an explicit input scale (AWQ / SmoothQuant with explicit_scales)
            new = InputScaledLinear(entry.site.in_features, entry.site.out_features, entry.scheme,
                                    packed_by_weight[key], module.bias, divisor)  # fmt: skip
        _set_module(model, entry.site.name, new)
        swapped += 1
    return swapped
