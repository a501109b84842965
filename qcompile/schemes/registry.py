"""One registry keyed by scheme family: what a family brings besides its scheme dataclass.

A family module (``qcompile/schemes/<family>.py``) defines its scheme and ends with one
:func:`register_family` call; ``qcompile.schemes`` imports every module of the package, so a new family is one
new file here plus its kernels, lowering and tests — no central list to edit.

| field            | what it holds                                                                             |
|------------------|-------------------------------------------------------------------------------------------|
| ``scheme``       | the frozen dataclass (parses names, declares packed tensors, packs, has the reference)    |
| ``examples``     | names that show the family's forms (for "did you mean" hints and docs)                    |
| ``algorithms``   | the algorithms that can write it (``rtn`` always can)                                     |
| ``kernels``      | modules with ``kernel_entries(family) -> [KernelEntry]``, imported on the first call      |
| ``onnx``         | ``"module:function"`` of its ONNX lowering, or ``None`` (export then names the layer)     |

Kernel rows land in :attr:`Family.rows` (``qcompile.runtime.dispatch`` fills and reads them).
"""

from __future__ import annotations

import dataclasses
import importlib

from qcompile.schemes.base import Scheme


@dataclasses.dataclass
class Family:
    name: str
    scheme: type[Scheme]
    examples: tuple[str, ...]
    algorithms: tuple[str, ...] = ("rtn",)
    kernels: tuple[str, ...] = ()
    onnx: str | None = None
    #: kernel rows, best first (filled by ``qcompile.runtime.dispatch``)
    rows: list = dataclasses.field(default_factory=list)
    kernels_loaded: bool = False

    def onnx_lowering(self):
        """The ONNX lowering function, or ``None`` when the family has none."""
        if self.onnx is None:
            return None
        module, _, function = self.onnx.partition(":")
        return getattr(importlib.import_module(module), function)


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    if family.scheme.family != family.name:
        raise ValueError(f"family {family.name!r}: its scheme class says family {family.scheme.family!r}")
    if "rtn" not in family.algorithms:
        family = dataclasses.replace(family, algorithms=("rtn", *family.algorithms))
    previous = _FAMILIES.get(family.name)
    if previous is not None:
        family.rows = previous.rows  # re-registration keeps rows registered so far
    _FAMILIES[family.name] = family
    return family


def families() -> list[Family]:
    return list(_FAMILIES.values())


def family(name: str) -> Family:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown scheme family {name!r}; known: {', '.join(_FAMILIES)}") from None


def family_of(scheme: Scheme) -> Family:
    return family(scheme.family)


def check_algorithm(scheme: Scheme, algorithm: str, where: str = "") -> None:
    """Raise ``ValueError`` when ``algorithm`` cannot write ``scheme``'s family."""
    allowed = family_of(scheme).algorithms
    if algorithm not in allowed:
        at = f"{where}: " if where else ""
        raise ValueError(f"{at}algorithm {algorithm!r} cannot write {scheme.name} (family {scheme.family}); "
                         f"algorithms for it: {', '.join(allowed)}")  # fmt: skip
