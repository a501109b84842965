"""Kernel rows for schemes that keep another family's packed layout (the peer families, :mod:`qcompile.schemes.peers`).

Such a scheme says, per activation dtype, which scheme's kernels compute its numbers (``kernel_layout(dtype)``: its
``layout`` for weight-only schemes, or ``None``). Each row of that scheme's family (``int-weight-only`` or ``fp8``)
on the requested device becomes a row of the calling family whose predicate and binder see the layout scheme
renamed to the calling scheme's name: the name the C++ op keys its plans by and the fallback notice shows.
"""

from __future__ import annotations

import dataclasses
import functools

from qcompile.runtime import dispatch
from qcompile.runtime.dispatch import KernelEntry
from qcompile.schemes.fp8 import FP8
from qcompile.schemes.integer import IntWeightOnly
from qcompile.schemes.registry import family as family_record

#: families whose layouts peer schemes keep
LAYOUT_FAMILIES = ("int-weight-only", "fp8")


@dataclasses.dataclass(frozen=True)
class NamedIntWeightOnly(IntWeightOnly):
    """An ``int-weight-only`` scheme under another scheme's name (``alias``)."""

    alias: str = ""

    @property
    def name(self) -> str:
        return self.alias


@dataclasses.dataclass(frozen=True)
class NamedFP8(FP8):
    """An ``fp8`` scheme under another scheme's name (``alias``)."""

    alias: str = ""

    @property
    def name(self) -> str:
        return self.alias


_NAMED = {IntWeightOnly: NamedIntWeightOnly, FP8: NamedFP8}


@functools.lru_cache(maxsize=None)
def named_layout(layout, name: str):
    """``layout`` (an ``int-weight-only`` or ``fp8`` scheme) under the name ``name``."""
    fields = {f.name: getattr(layout, f.name) for f in dataclasses.fields(layout)}
    return _NAMED[type(layout)](**fields, alias=name)


def _target(scheme, x):
    kernel_layout = getattr(scheme, "kernel_layout", None)
    return None if kernel_layout is None else kernel_layout(x.dtype)


def _supports(row: KernelEntry, scheme, x, packed) -> str | None:
    layout = _target(scheme, x)
    if layout is None:
        return f"no kernel of another family computes {scheme.name}'s numbers for {x.dtype} activations"
    if layout.family not in row.families:
        return f"{scheme.name} keeps the {layout.family} layout, which this row does not read"
    return row.supports(named_layout(layout, scheme.name), x, packed)


def _bind(row: KernelEntry, scheme, x, packed, bias, out_features):
    return row.bind(named_layout(_target(scheme, x), scheme.name), x, packed, bias, out_features)


def delegated_entries(family: str, device_type: str) -> list[KernelEntry]:
    """Rows of ``family`` that run the ``device_type`` rows of :data:`LAYOUT_FAMILIES` on each scheme's layout."""
    rows: dict[str, KernelEntry] = {}
    for target in LAYOUT_FAMILIES:
        dispatch.load_family_kernels(target)
        for row in family_record(target).rows:
            if row.device_type == device_type:
                rows.setdefault(row.name, row)
    return [
        KernelEntry(f"{family}:{row.name}", device_type, (family,), functools.partial(_supports, row),
                    functools.partial(_bind, row), row.priority, row.inline)
        for row in rows.values()
    ]  # fmt: skip
