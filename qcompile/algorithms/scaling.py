"""Equivalent per-input-channel scaling (AWQ, SmoothQuant): ``y = (x / s) @ (W · s)ᵀ`` where ``x / s`` is
folded into the op that produces ``x``, so the float model computes the same function and only the
weight the quantizer sees changes.

Which op produces a linear's input is read from :data:`FOLDS`, AutoAWQ's mapping for Llama-style
decoder blocks (Llama, Mistral, Qwen2, SmolLM …), with names relative to the block:

| produces ``x``             | linears reading ``x``      | fold ``x / s`` as                         |
|----------------------------|----------------------------|-------------------------------------------|
| `input_layernorm`          | q_proj, k_proj, v_proj     | norm ``weight /= s`` (and ``bias``)       |
| `self_attn.v_proj`         | o_proj                     | v_proj output rows ``/= s`` (equal widths only)  |
| `post_attention_layernorm` | gate_proj, up_proj         | norm ``weight /= s``                      |
| `mlp.up_proj`              | down_proj                  | up_proj output rows ``/= s``              |

Under grouped-query attention ``v_proj`` has fewer outputs than ``o_proj`` reads: no fold there.

A site whose algorithm scales but that no row above covers keeps its weights unscaled (plain
round-to-nearest) and the calibration pass warns, naming it. Weights are edited in place, so a graph
captured from the model beforehand (``torch.export`` shares the parameters) sees the same edit.
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


def why_not_foldable(modules: dict[str, torch.nn.Module], group: FoldGroup) -> str | None:
    """``None`` when ``group`` can take a scale, else the reason in words."""
    producer = modules[group.producer]
    width = _linear_in(modules[group.members[0]])
    if any(_linear_in(modules[m]) != width for m in group.members):
        return "its linears read inputs of different widths"
    if isinstance(producer, torch.nn.Linear):
        if producer.out_features != width:
            return (f"{group.producer} has {producer.out_features} outputs but the next linear reads {width} "
                    "(grouped-query attention repeats them)")  # fmt: skip
        return None
    name = type(producer).__name__
    weight = getattr(producer, "weight", None)
    if isinstance(producer, torch.nn.LayerNorm) or (name.endswith("RMSNorm") and "Gemma" not in name):
        if weight is None or weight.shape != (width,):
            return f"{group.producer} has no per-channel weight of width {width}"
        return None
    return f"{group.producer} ({name}) is not a norm or linear whose output can absorb a scale"


def _linear_in(module: torch.nn.Module) -> int:
    return module.weight.shape[1]


@torch.no_grad()
def fold_scale(modules: dict[str, torch.nn.Module], group: FoldGroup, scale: torch.Tensor) -> None:
    """Apply ``x → x / s``, ``W → W · s`` to ``group`` in place (``scale [K]``, positive)."""
    producer = modules[group.producer]
    s = scale.to(torch.float32)
    if isinstance(producer, torch.nn.Linear):
        producer.weight.div_(s.to(producer.weight.dtype).unsqueeze(1))
    else:
        producer.weight.div_(s.to(producer.weight.dtype))
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(s.to(producer.bias.dtype))
    for member in group.members:
        weight = modules[member].weight
        weight.mul_(s.to(weight.dtype).unsqueeze(0))
