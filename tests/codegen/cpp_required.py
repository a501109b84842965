"""Whether the C++ tests may skip: only when the user switched the C++ path off or no compiler exists.

A kernel library or C++ op that fails to *build* is a failure of the suite, not a skip: :func:`skip_reason`
builds both and lets the compiler's error propagate (the library code itself turns it into a warning so that
users keep the Python path; a test run must not).
"""

from __future__ import annotations

import functools
import os

import torch

from qcompile.codegen.cpp import build, library, op


@functools.lru_cache(maxsize=1)
def skip_reason() -> str | None:
    """``None`` after building (or finding) the kernel library and the C++ op; a one-line reason when the user
    switched the op off (``QCOMPILE_CPU_OP=0``) or no C++ compiler exists. A failed build raises."""
    if os.environ.get(op.ENV, "1").strip() == "0":
        return f"{op.ENV}=0 switches the C++ CPU op off"
    try:
        build.compiler()
    except build.CompilerError as error:
        return str(error)
    library.load()  # raises build.CompilerError with the compiler's output when the kernels fail to build
    if not op.load():
        torch.ops.load_library(str(op.compile_library(library.library_file())))  # the same error, raised
    return None
