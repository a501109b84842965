"""Progress for long work: a tqdm bar on a terminal, plain lines elsewhere (logs, CI, notebooks' captured
stderr), so a long run is never silent.

Plain lines come at about every tenth of the work and at the end::

    quantize: 3/30 layers (10%), 1.2 s
    ...
    quantize: 30/30 layers (100%), 11.8 s
"""

from __future__ import annotations

import sys
import time


def _plain(items: list, description: str, stream, unit: str):
    total = len(items)
    step = max(1, total // 10)
    start = time.perf_counter()
    for index, item in enumerate(items, 1):
        yield item
        if index % step == 0 or index == total:
            print(f"{description}: {index}/{total} {unit}s ({100 * index // total}%), "
                  f"{time.perf_counter() - start:.1f} s", file=stream, flush=True)  # fmt: skip


def progress(items, description: str, enabled: bool = True, stream=None, unit: str = "layer"):
    """``items``, reported as they are consumed: a bar when ``stream`` (stderr) is a terminal and tqdm is
    installed, else plain lines. ``enabled=False`` (or fewer than two items): silent."""
    items = list(items)
    stream = stream if stream is not None else sys.stderr
    if not enabled or len(items) < 2:
        return items
    if not getattr(stream, "isatty", lambda: False)():
        return _plain(items, description, stream, unit)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _plain(items, description, stream, unit)
    return tqdm(items, desc=description, unit=unit, leave=False, file=stream)
