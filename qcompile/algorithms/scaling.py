"""Equivalent per-input-channel scaling (AWQ, SmoothQuant): ``y = (x / s) @ (W · s)ᵀ`` where ``x / s`` is
folded into the op that produces ``x``, so the float model computes the same function and only the
weight the quantizer sees changes.

Which op produces a linear's input is found from the model itself (:func:`traced_groups`): one forward on one
calibration batch with hooks that record every module's output tensor and every linear's input tensor; a linear
whose input *is* (the same tensor object) a module's output reads that module, and the linears reading the same
output form a :class:`FoldGroup`. :data:`FOLDS`, AutoAWQ's mapping for Llama-style decoder blocks, adds the groups
no module output shows (``v_proj`` → ``o_proj``: attention lies between them). A producer can take ``x / s`` when
it is (:func:`why_not_foldable`)

| producer                                                           | fold ``x / s`` as                        |
|--------------------------------------------------------------------|------------------------------------------|
| a linear (``nn.Linear``, ``Conv1D``) with ``K`` outputs            | its output rows (weight, bias) ``/= s``  |
| a module with a per-channel ``weight [K]`` (and ``bias [K]``): norms | ``weight /= s``, ``bias /= s``           |

and the fold keeps the function: every candidate is checked by :func:`probe_group` (a random positive scale is
folded, the block or model runs on one batch, its output must not move beyond rounding, the tensors are put back
bit for bit). That rejects producers whose output also feeds something else (a post-norm residual), modules whose
weight is no plain per-channel factor (Gemma's ``1 + weight``) and readers that reshape the output first.

A site whose algorithm scales but that no group covers keeps its weights unscaled (plain round-to-nearest), or,
with the option ``explicit_scales``, an explicit input scale (``W · s`` quantized, ``x / s`` at run time); the
calibration pass warns, naming it and the reason. Weights are edited in place, so a graph captured from the model
beforehand (``torch.export`` shares the parameters) sees the same edit.
"""

from __future__ import annotations

import dataclasses

import torch

SCALING_ALGORITHMS = ("awq", "smoothquant")
FOLDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)


@dataclasses.dataclass
class FoldGroup:
    """Linears (``members``, full module paths) sharing an input produced by ``producer``."""

    producer: str
    members: tuple[str, ...]


def is_linear(module: torch.nn.Module) -> bool:
    """``nn.Linear`` (weight ``[N, K]``) or transformers' ``Conv1D`` (weight ``[K, N]``)."""
    return isinstance(module, torch.nn.Linear) or _is_conv1d(module)


def _is_conv1d(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def _linear_in(module: torch.nn.Module) -> int:
    return module.weight.shape[0] if _is_conv1d(module) else module.weight.shape[1]


def _linear_out(module: torch.nn.Module) -> int:
    return module.weight.shape[1] if _is_conv1d(module) else module.weight.shape[0]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def fold_groups(modules: dict[str, torch.nn.Module], sites: list[str]) -> list[FoldGroup]:
    """Every :data:`FOLDS` row present in the model that covers one of ``sites``."""
    out, seen = [], set()
    for site in sites:
        for producer, members in FOLDS:
            for member in members:
                if site == member or site.endswith("." + member):
                    prefix = site[: len(site) - len(member)].rstrip(".")
                    key = (prefix, producer)
                    full = tuple(_join(prefix, m) for m in members)
                    if key not in seen and _join(prefix, producer) in modules and all(m in modules for m in full):
                        seen.add(key)
                        out.append(FoldGroup(_join(prefix, producer), full))
    return out


class _Trace:
    """Hooks on every module under ``root``: each module's tensor output and each linear's input, by identity."""

    def __init__(self, root: torch.nn.Module, prefix: str):
        self.outputs: dict[int, tuple[torch.Tensor, list[str]]] = {}  # id → (tensor kept alive, producers in order)
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.handles = []
        for name, module in root.named_modules():
            full = _join(prefix, name)
            self.handles.append(module.register_forward_hook(lambda _m, _a, out, n=full: self._output(n, out)))
            if is_linear(module):
                self.handles.append(module.register_forward_pre_hook(
                    lambda _m, args, kwargs, n=full: self._input(n, args, kwargs), with_kwargs=True))  # fmt: skip

    def _output(self, name, out):
        if isinstance(out, torch.Tensor):
            kept = self.outputs.setdefault(id(out), (out, []))
            if kept[0] is out:
                kept[1].append(name)

    def _input(self, name, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(x, torch.Tensor):
            self.inputs.setdefault(name, []).append(x)

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def producers(self, name: str) -> list[str]:
        """Modules (innermost first) whose output is the tensor ``name`` read (``[]``: no module's output)."""
        seen = self.inputs.get(name, [])
        if len(seen) != 1:
            return []
        kept = self.outputs.get(id(seen[0]))
        return list(kept[1]) if kept is not None and kept[0] is seen[0] else []


def traced_groups(root: torch.nn.Module, prefix: str, forward, sites: list[str]) -> tuple[list[FoldGroup], dict]:
    """``(groups, reasons)``: run ``forward()`` (``root`` on one batch) with a :class:`_Trace`; a group per module
    output read by linears, for the outputs one of ``sites`` reads; ``reasons``: why a site has none."""
    modules = {_join(prefix, n): m for n, m in root.named_modules()}
    trace = _Trace(root, prefix)
    try:
        forward()
    finally:
        trace.remove()
    readers: dict[int, list[str]] = {}
    for name, seen in trace.inputs.items():
        if len(seen) == 1:
            readers.setdefault(id(seen[0]), []).append(name)
    groups, reasons, covered = [], {}, set()
    for site in sites:
        if site in covered:
            continue
        calls = len(trace.inputs.get(site, []))
        producers = trace.producers(site)
        if calls != 1:
            reasons[site] = f"it ran {calls} times in one forward (one input scale cannot serve every call)"
            continue
        if not producers:
            reasons[site] = "its input is no module's output (the model's or the block's input, or a tensor op)"
            continue
        members = tuple(readers[id(trace.inputs[site][0])])
        width = _linear_in(modules[site])
        producer = next((p for p in producers if _absorbs(modules[p], width)), producers[0])
        groups.append(FoldGroup(producer, members))
        covered.update(members)
    return groups, reasons


def _absorbs(module: torch.nn.Module, width: int) -> bool:
    if is_linear(module):
        return _linear_out(module) == width
    weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
    return weight is not None and tuple(weight.shape) == (width,) and (bias is None or tuple(bias.shape) == (width,))


def why_not_foldable(modules: dict[str, torch.nn.Module], group: FoldGroup) -> str | None:
    """``None`` when ``group``'s shapes let its producer take a scale, else the reason in words."""
    producer = modules[group.producer]
    width = _linear_in(modules[group.members[0]])
    if any(_linear_in(modules[m]) != width for m in group.members):
        return "its linears read inputs of different widths"
    name = type(producer).__name__
    if is_linear(producer):
        if _linear_out(producer) != width:
            return (f"{group.producer} has {_linear_out(producer)} outputs but the next linear reads {width} "
                    "(grouped-query attention repeats them)")  # fmt: skip
        return None
    if _absorbs(producer, width):
        return None
    if producer._parameters.get("weight") is None:
        return f"its input comes from {group.producer} ({name}), which has no per-channel weight to absorb a scale"
    return f"{group.producer} ({name}) has no per-channel weight of width {width} to absorb a scale"


def _tensors(group: FoldGroup, modules) -> list[torch.Tensor]:
    producer = modules[group.producer]
    out = [producer.weight] + ([producer.bias] if getattr(producer, "bias", None) is not None else [])
    return out + [modules[m].weight for m in group.members]


@torch.no_grad()
def fold_scale(modules: dict[str, torch.nn.Module], group: FoldGroup, scale: torch.Tensor, journal=None) -> None:
    """Apply ``x → x / s``, ``W → W · s`` to ``group`` in place (``scale [K]``, positive). ``journal``: a
    :class:`Journal` that keeps each tensor's value before its first edit."""
    if journal is not None:
        for tensor in _tensors(group, modules):
            journal.save(tensor)
    producer = modules[group.producer]
    s = scale.to(torch.float32)
    if isinstance(producer, torch.nn.Linear):
        producer.weight.div_(s.to(producer.weight.dtype).unsqueeze(1))
    else:  # a Conv1D's [K, N] weight or a per-channel weight [N]: the last axis
        producer.weight.div_(s.to(producer.weight.dtype))
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(s.to(producer.bias.dtype))
    for member in group.members:
        weight = modules[member].weight
        if _is_conv1d(modules[member]):
            weight.mul_(s.to(weight.dtype).unsqueeze(1))
        else:
            weight.mul_(s.to(weight.dtype).unsqueeze(0))


def output_tensors(out) -> list[torch.Tensor]:
    """The floating tensors of a module's output (a tensor, tuple, list, dict or ``ModelOutput``), in order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.dtype.is_floating_point else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in output_tensors(item)]
    return []


def relative_change(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """``‖a − b‖ / ‖b‖`` over all tensors (float64); ``inf`` when their shapes differ."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    num = sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(a, b))
    den = sum(float(y.double().pow(2).sum()) for y in b)
    return (num / max(den, 1e-300)) ** 0.5


def probe_tolerance(dtype: torch.dtype) -> float:
    """The relative output change a fold may cause by rounding alone (a wrong fold moves it by ~0.1-1)."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2


@torch.no_grad()
def probe_group(modules, group: FoldGroup, forward, reference: list[torch.Tensor], seed: int = 0) -> str | None:
    """``None`` when folding a random scale (in ``[1/2, 2]``) into ``group`` leaves ``forward()``'s output tensors
    at ``reference`` (within :func:`probe_tolerance`); else the reason. The group's tensors are restored exactly."""
    width = _linear_in(modules[group.members[0]])
    generator = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.rand(width, generator=generator) * 2 - 1)
    journal = Journal()
    fold_scale(modules, group, scale, journal)
    try:
        got = output_tensors(forward())
    finally:
        journal.restore()
    change = relative_change(got, reference)
    dtype = reference[0].dtype if reference else torch.float32
    if change <= probe_tolerance(dtype):
        return None
    return (f"folding a scale into {group.producer} changes the output (relative change {change:.2g}): its output "
            f"feeds more than {', '.join(group.members)}")  # fmt: skip


class Journal:
    """Tensors edited in place, with their values before the first edit: :meth:`restore` puts them back."""

    def __init__(self):
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def save(self, tensor: torch.Tensor) -> None:
        if id(tensor) not in self.saved:
            self.saved[id(tensor)] = (tensor, tensor.detach().clone())

    @torch.no_grad()
    def restore(self) -> None:
        for tensor, value in self.saved.values():
            tensor.copy_(value)
        self.saved.clear()
