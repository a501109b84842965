"""Progress bars for long work (tqdm when the output is a terminal or asked for)."""

from __future__ import annotations

import sys


def progress(items, description: str, enabled: bool = True):
    items = list(items)
    if not enabled or len(items) < 2:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=description, unit="layer", leave=False, file=sys.stderr, disable=None)
