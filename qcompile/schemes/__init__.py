"""Quantization schemes: frozen dataclasses with short names that round-trip.

Each family is one module here that documents its schemes, packed tensors and formulas where it defines them, and
ends with one :func:`register_family` call; ``docs/formats.md`` and ``docs/recipes.md`` list the families and their
schemes, and :func:`families` lists what is registered.

Every module of this package that defines a family registers it (:mod:`qcompile.schemes.registry`); this
package imports them all, so a new family is a new module and nothing here changes.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import pkgutil

from qcompile.schemes.base import PackedWeight, QuantizedWeight, Scheme, TensorSpec
from qcompile.schemes.registry import Family, families, family, family_of, register_family

_NOT_FAMILIES = {"base", "registry", "packing"}
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in _NOT_FAMILIES:
        importlib.import_module(f"{__name__}.{_module}")

from qcompile.schemes.fp8 import FP8  # noqa: E402  (families the rest of the package names directly)
from qcompile.schemes.integer import IntWeightOnly  # noqa: E402
from qcompile.schemes.nf4 import NF4  # noqa: E402
from qcompile.schemes.w4a8 import W4A8Int  # noqa: E402
from qcompile.schemes.w8a8 import W8A8Int  # noqa: E402


class SchemeError(ValueError):
    """An unknown or malformed scheme name."""


def example_names() -> tuple[str, ...]:
    return tuple(name for f in families() for name in f.examples)


@functools.lru_cache(maxsize=None)
def parse_scheme(name: str) -> Scheme:
    """``"int4-g128"`` → ``IntWeightOnly(bits=4, group_size=128, symmetric=False)``."""
    if isinstance(name, Scheme):
        return name
    if not isinstance(name, str):
        raise SchemeError(f"a scheme is a name such as 'int4-g128', got {type(name).__name__}")
    for registered in families():
        try:
            scheme = registered.scheme.from_name(name.strip().lower())
        except ValueError as error:
            raise SchemeError(f"scheme {name!r}: {error}") from None
        if scheme is not None:
            return scheme
    close = difflib.get_close_matches(name, example_names(), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise SchemeError(f"unknown scheme {name!r}.{hint} Known forms: {', '.join(example_names())}")


def as_scheme(value: str | Scheme) -> Scheme:
    return value if isinstance(value, Scheme) else parse_scheme(value)


__all__ = [
    "FP8", "Family", "IntWeightOnly", "NF4", "PackedWeight", "QuantizedWeight", "Scheme", "SchemeError",
    "TensorSpec", "W4A8Int", "W8A8Int", "as_scheme", "example_names", "families", "family", "family_of",
    "parse_scheme", "register_family",
]  # fmt: skip
