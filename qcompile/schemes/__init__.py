"""Quantization schemes: frozen dataclasses with short names that round-trip.

| name                         | family            | weights                            | activations           |
|------------------------------|-------------------|------------------------------------|-----------------------|
| `int8`                       | W8A16             | int8 per channel, symmetric        | float                 |
| `int4-g128`, `int4-g32`, `int4` | W4A16          | int4 per group (or channel), asym  | float                 |
| `int4-g128-sym`              | W4A16             | int4 per group, symmetric          | float                 |
| `int3-gN`, `int2-gN`         | W3A16, W2A16      | as int4                            | float                 |
| `nf4-g64`                    | NF4 (QLoRA)       | NormalFloat4 levels, absmax/group  | float                 |
| `w8a8`                       | W8A8-int8         | int8 per channel                   | int8 per token, dynamic |
| `w4a8-g128`, `w4a8-g32-sym`  | W4A8-int          | int4 per group (as `int4-gN`)      | int8 per token, dynamic |
| `fp8`                        | FP8 weight-only   | e4m3 per channel                   | float                 |
| `fp8-w8a8`                   | W8A8-FP8          | e4m3 per channel                   | e4m3 per row, dynamic |

A new scheme family is one module here plus an entry in ``FAMILIES``.
"""

from __future__ import annotations

import difflib
import functools

from qcompile.schemes.base import PackedWeight, QuantizedWeight, Scheme
from qcompile.schemes.fp8 import FP8
from qcompile.schemes.integer import IntWeightOnly
from qcompile.schemes.nf4 import NF4
from qcompile.schemes.w4a8 import W4A8Int
from qcompile.schemes.w8a8 import W8A8Int

FAMILIES: tuple[type[Scheme], ...] = (IntWeightOnly, W8A8Int, W4A8Int, FP8, NF4)
EXAMPLE_NAMES = (
    "int8", "int4", "int4-g32", "int4-g64", "int4-g128", "int4-g128-sym", "int3-g128", "int2-g64",
    "nf4-g64", "w8a8", "w4a8-g128", "w4a8-g32", "fp8", "fp8-w8a8",
)  # fmt: skip


class SchemeError(ValueError):
    """An unknown or malformed scheme name."""


@functools.lru_cache(maxsize=None)
def parse_scheme(name: str) -> Scheme:
    """``"int4-g128"`` → ``IntWeightOnly(bits=4, group_size=128, symmetric=False)``."""
    if isinstance(name, Scheme):
        return name
    if not isinstance(name, str):
        raise SchemeError(f"a scheme is a name such as 'int4-g128', got {type(name).__name__}")
    for family in FAMILIES:
        try:
            scheme = family.from_name(name.strip().lower())
        except ValueError as error:
            raise SchemeError(f"scheme {name!r}: {error}") from None
        if scheme is not None:
            return scheme
    close = difflib.get_close_matches(name, EXAMPLE_NAMES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise SchemeError(f"unknown scheme {name!r}.{hint} Known forms: {', '.join(EXAMPLE_NAMES)}")


def as_scheme(value: str | Scheme) -> Scheme:
    return value if isinstance(value, Scheme) else parse_scheme(value)


__all__ = [
    "FAMILIES", "FP8", "IntWeightOnly", "NF4", "PackedWeight", "QuantizedWeight", "Scheme", "SchemeError",
    "W4A8Int", "W8A8Int", "as_scheme", "parse_scheme",
]  # fmt: skip
