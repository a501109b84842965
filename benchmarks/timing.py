"""Timing shared by the benchmark scripts (run as ``python benchmarks/<script>.py``, so this imports as ``timing``)."""

from __future__ import annotations

import statistics
import time


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3
