"""Calibration statistics for the algorithms that need them (GPTQ, AWQ, SmoothQuant)."""

from __future__ import annotations

import dataclasses

from qcompile.algorithms import get_algorithm
from qcompile.algorithms.options import check_plan_options


def needs_calibration(plan) -> bool:
    return any(get_algorithm(e.algorithm).needs_calibration for e in plan.to_quantize())


def statistics_for(model, plan, calibration):
    """Per-site statistics when some planned algorithm needs them, else ``None``. The recipe's options are checked
    first (every plan, calibrated or not)."""
    check_plan_options(plan)
    if not needs_calibration(plan):
        return None
    from qcompile.algorithms.calibrate import collect_statistics

    return collect_statistics(model, plan, calibration)


def annotated(plan, stats):
    """``plan`` with each calibrated entry's ``calibration`` note (what the pass did to it) from ``stats``."""
    if not stats:
        return plan
    entries = tuple(dataclasses.replace(e, calibration=stats[e.site.name].note)
                    if e.site.name in stats and stats[e.site.name].note else e for e in plan.entries)  # fmt: skip
    return dataclasses.replace(plan, entries=entries)
