"""The one directory qcompile caches in: built C++ libraries, tuned Triton configs, converted models.

``$QCOMPILE_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/qcompile``, else ``~/.cache/qcompile``. Below it:
``cpp/<hash>/`` (the kernel library, ``codegen/cpp/build.py``), ``triton/tuned-configs.json``
(``codegen/triton/autotune.py``) and ``models/`` (``qcompile/models.py``). Every file there can be deleted;
it is made again when needed.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "QCOMPILE_CACHE_DIR"


def cache_root() -> Path:
    root = os.environ.get(ENV)
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qcompile"
