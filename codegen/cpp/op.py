"""The C++ dispatcher kernel of ``qcompile::linear`` for CPU tensors (``op/qcompile_op.cpp``).

Built with torch's headers on first CPU use (about 15 s, once per machine: cached by a hash of the source,
the kernel library, torch's version, the flags and the compiler) and loaded with ``torch.ops.load_library``.
From then on a decode-sized call goes dispatcher → C++ → kernel with no Python in between; the first call of
each signature still runs the Python implementation, which validates it, picks the kernel row and hands the
C++ side a plan (:func:`remember`). ``QCOMPILE_CPU_OP=0`` keeps every call on the Python path.

Without a working build the Python path serves every call, after one warning.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import tempfile
import warnings

import torch

from qcompile.codegen.cpp import build

SOURCE = build.SOURCE_DIR / "op" / "qcompile_op.cpp"
#: every source of the op library: the linear op and the decoder's small fused ops (``op/decoder_ops.cpp``)
SOURCES = tuple(sorted((build.SOURCE_DIR / "op").glob("*.cpp")))
LIBRARY_NAME = "libqcompile_op.so"
ENV = "QCOMPILE_CPU_OP"
FLAGS = ("-O2", "-std=c++20", "-fPIC", "-shared", "-w")


def _torch_flags() -> list[str]:
    from torch.utils import cpp_extension

    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [*(f"-I{p}" for p in cpp_extension.include_paths()), f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-L{lib}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{lib}"]  # fmt: skip


def library_path(cpu_library: pathlib.Path) -> pathlib.Path:
    cxx = build.compiler()
    digest = hashlib.sha256()
    sources = b"\0".join(s.read_bytes() for s in SOURCES)
    for part in (sources, (build.SOURCE_DIR / "qc_abi.h").read_bytes(), str(cpu_library).encode(),
                 torch.__version__.encode(), repr(FLAGS).encode(), build._compiler_version(cxx).encode()):  # fmt: skip
        digest.update(part + b"\0")
    return build.cache_root() / "op" / digest.hexdigest()[:24] / LIBRARY_NAME


def compile_library(cpu_library: pathlib.Path) -> pathlib.Path:
    """The op library for this kernel library, compiled first when the cache does not hold it."""
    target = library_path(cpu_library)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix="build-") as work:
        temporary = os.path.join(work, LIBRARY_NAME)
        link = [f"-L{cpu_library.parent}", f"-l:{cpu_library.name}", f"-Wl,-rpath,{cpu_library.parent}"]
        command = [build.compiler(), *FLAGS, *map(str, SOURCES), "-o", temporary, *_torch_flags(), *link]
        build._run(command, SOURCE.name)
        os.replace(temporary, target)
    return target


@functools.lru_cache(maxsize=1)
def load() -> bool:
    """Build (or find) and load the op library once per process; ``False`` (after one warning) without it."""
    if os.environ.get(ENV, "1").strip() == "0":
        return False
    from qcompile.codegen.cpp import library

    try:
        torch.ops.load_library(str(compile_library(library.library_file())))
    except (build.CompilerError, OSError, RuntimeError) as error:
        warnings.warn(f"qcompile: the C++ CPU op is unavailable, CPU calls go through Python ({error})")
        return False
    return True


def loaded() -> bool:
    return load.cache_info().currsize > 0 and load()


def remember(scheme, x, packed, bias, out_features: int, kernel: str, ints=(), floats=(), max_tokens: int = 0,
             slices=None):
    """Hand the C++ op the plan for this call signature: kernel ``kernel`` of the library's table, with its
    parameters, for calls of up to ``max_tokens`` tokens (0: any); calls of more tokens take the GEMM path that
    ``slices`` (a :class:`launch.Slices`) describes, or go to Python when it is ``None``. A no-op while the op
    library is not loaded."""
    if loaded():
        gemm = ("", [], [], [], 0, "") if slices is None else (
            slices.kernel, list(slices.ints), [float(v) for v in slices.floats], list(slices.slots), slices.rows,
            slices.prologue)  # fmt: skip
        torch.ops.qcompile_cpu.remember(x, list(packed), bias, scheme.name, out_features, kernel, list(ints),
                                        [float(v) for v in floats], max_tokens, *gemm)  # fmt: skip


def forget() -> None:
    """Drop every plan (the dispatch table changed)."""
    if loaded():
        torch.ops.qcompile_cpu.forget()


def stats() -> dict[str, int]:
    """Calls the C++ kernel served itself, calls it handed to Python, plans it holds."""
    fast, fallback, plans = torch.ops.qcompile_cpu.stats() if loaded() else (0, 0, 0)
    return {"fast": fast, "fallback": fallback, "plans": plans}
