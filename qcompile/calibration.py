"""Calibration statistics for the algorithms that need them (GPTQ, AWQ, SmoothQuant)."""

from __future__ import annotations

from qcompile.algorithms import get_algorithm


def needs_calibration(plan) -> bool:
    return any(get_algorithm(e.algorithm).needs_calibration for e in plan.to_quantize())


def statistics_for(model, plan, calibration):
    """Per-site statistics when some planned algorithm needs them, else ``None``."""
    if not needs_calibration(plan):
        return None
    from qcompile.algorithms.calibrate import collect_statistics

    return collect_statistics(model, plan, calibration)
