"""C++ kernels for ``qcompile::linear`` on CPUs.

The kernel library (``kernels/*.h``, one shared library per machine, cached on disk, see ``build.py``) is
compiled on the first CPU call of a family that has C++ rows; each family's rows live in a module that the family
names in its registry entry (``Family.kernels``) and gives them with ``kernel_entries(family)``,
e.g. ``integer`` (rows ``cpp-w8a16``, ``cpp-w4a16``, ``cpp-w8a8``, ``cpp-w4a8``). A family's kernels are its own
header in ``kernels/`` plus that module; nothing here names a family (``docs/cpu-kernels.md`` lists the rows).

Schemes without a row run the reference path. The same kernels back a C++ dispatcher kernel for CPU tensors
(``op.py``), so decode-sized calls skip Python.
"""

from __future__ import annotations

import functools
import warnings

PRIORITY = 10


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Build or load the kernel library (and the C++ op) once; ``False``, after one warning, without a compiler."""
    from qcompile.codegen.cpp import build, library, op
    from qcompile.runtime.dispatch import on_forget

    try:
        library.load()
    except build.CompilerError as error:
        warnings.warn(f"qcompile: C++ CPU kernels are unavailable, CPU calls use the reference path ({error})")
        return False
    op.load()
    on_forget(op.forget)
    return True
