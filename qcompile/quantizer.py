"""The quantize stage: a plan entry + its float weight → packed tensors (behind ``qcompile.quantize`` and friends)."""

from __future__ import annotations

import torch

from qcompile.algorithms import get_algorithm
from qcompile.plan import PlanEntry
from qcompile.schemes import PackedWeight
from qcompile.schemes.registry import check_algorithm


def quantize_entry(entry: PlanEntry, weight: torch.Tensor, stats=None) -> PackedWeight:
    """Quantize ``weight`` (as stored: ``[N, K]``, or ``[K, N]`` for transposed sites) per ``entry``."""
    scheme = entry.parsed
    if scheme is None:
        raise ValueError(f"site {entry.site.name} is planned to stay float")
    w = weight.detach()
    if entry.site.transposed:
        w = w.t()
    if tuple(w.shape) != (entry.site.out_features, entry.site.in_features):
        raise ValueError(
            f"site {entry.site.name}: weight is {list(w.shape)}, the plan expects "
            f"[{entry.site.out_features}, {entry.site.in_features}]"
        )
    check_algorithm(scheme, entry.algorithm, where=f"site {entry.site.name}")
    algorithm = get_algorithm(entry.algorithm)
    if algorithm.needs_calibration and stats is None:
        raise ValueError(
            f"site {entry.site.name}: algorithm {entry.algorithm!r} needs calibration data "
            "(pass calibration=... to qcompile.quantize / qcompile.compile)"
        )
    with torch.no_grad():
        q = algorithm.run(scheme, w.to(torch.float32).contiguous(), stats, dict(entry.options))
    return scheme.pack(q)
