"""Quantization algorithms: float weight (+ calibration statistics) → a scheme's canonical form.

Each algorithm is a function ``(scheme, weight [N, K] float32, stats, options: dict) -> QuantizedWeight``
registered in ``ALGORITHMS`` under the name recipes use. ``rtn`` (round to nearest) needs no statistics;
algorithms whose ``needs_calibration`` is true get the statistics the calibration pass collected for
their site.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from qcompile.schemes import QuantizedWeight, Scheme


@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str
    run: Callable[..., QuantizedWeight]
    needs_calibration: bool = False
    #: what the calibration pass collects for its sites: the inputs' Hessian ``XᵀX`` and/or samples of the inputs
    wants_hessian: bool = False
    wants_inputs: bool = False
    #: ``(block, prefix, inputs, modules, entries, stats)``: optimises the algorithm's sites of one calibration block
    #: jointly (before they are quantized) and keeps each result in its statistics (``stats[name].remember``)
    block_pass: Callable[..., None] | None = None


def _rtn(scheme: Scheme, weight, stats=None, options=None) -> QuantizedWeight:
    return scheme.quantize(weight)


ALGORITHMS: dict[str, Algorithm] = {"rtn": Algorithm("rtn", _rtn)}
# name → module that registers it on import (kept lazy: they pull in heavier code)
_LAZY = {
    "gptq": "qcompile.algorithms.gptq",
    "awq": "qcompile.algorithms.awq",
    "hqq": "qcompile.algorithms.hqq",
    "autoround": "qcompile.algorithms.autoround",
    "aqlm": "qcompile.algorithms.aqlm",
    "spqr": "qcompile.algorithms.spqr",
    "vptq": "qcompile.algorithms.vptq",
    "smoothquant": "qcompile.algorithms.smoothquant",
    "static-activations": "qcompile.algorithms.static_activations",
}


def algorithm_names() -> tuple[str, ...]:
    """Every algorithm a recipe may name: the registered ones and the lazily imported ones."""
    return tuple(dict.fromkeys([*ALGORITHMS, *_LAZY]))


def register_algorithm(algorithm: Algorithm) -> None:
    ALGORITHMS[algorithm.name] = algorithm


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS and name in _LAZY:
        try:
            importlib.import_module(_LAZY[name])
        except ModuleNotFoundError as error:
            raise NotImplementedError(f"algorithm {name!r} is not available in this build ({error})") from None
    if name not in ALGORITHMS:
        raise KeyError(f"unknown algorithm {name!r}; known: {', '.join(sorted({*ALGORITHMS, *_LAZY}))}")
    return ALGORITHMS[name]
