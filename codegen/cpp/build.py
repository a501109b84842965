"""Compile the C++ kernels of this package into one shared library, cached on disk by content hash.

One translation unit per instruction set (``isa_scalar.cpp``, ``isa_avx2.cpp``, ``isa_avx512.cpp``), each with
its own ``-m`` flags, plus ``cpu_features.cpp`` for run-time detection and the kernel table; all linked into
``libqcompile_cpu.so``. Every ISA unit includes every kernel file in ``kernels/`` (through a ``kernels.inc`` this
module writes), so a new format's kernels are one new file there.
No torch headers: a cold build takes a few seconds, and the library is called through ctypes.

Cache: ``<cache root>/cpp/<hash>/libqcompile_cpu.so`` (``qcompile.cache``), where the hash
covers every source file, the flags and the compiler's version line. A second process finds the file and
loads it without compiling. The library is written to a temporary name and renamed into place, so a crash
or a concurrent build never leaves a half-written ``.so`` under the final name.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

from qcompile.cache import cache_root

SOURCE_DIR = pathlib.Path(__file__).resolve().parent
LIBRARY_NAME = "libqcompile_cpu.so"
COMMON_FLAGS = ("-O3", "-fopenmp", "-fPIC", "-std=c++17", "-ffp-contract=off", "-mtune=native", "-w")
# The ISA is chosen at run time, so no unit uses -march=native: each gets exactly the instructions its name says.
UNIT_FLAGS = {
    "cpu_features.cpp": (),
    "isa_scalar.cpp": (),
    "isa_avx2.cpp": ("-mavx2", "-mfma", "-mf16c"),
    "isa_avx512.cpp": ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"),
}
LINK_FLAGS = ("-shared", "-fopenmp")

#: how many times this process compiled the library (tests check that a warm cache means zero)
builds_in_this_process = 0


class CompilerError(RuntimeError):
    """No usable C++ compiler, or the kernel sources failed to compile."""


def compiler() -> str:
    """The C++ compiler: ``$CXX`` or ``g++``; raises :class:`CompilerError` when it is missing."""
    name = os.environ.get("CXX", "g++")
    path = shutil.which(name)
    if path is None:
        raise CompilerError(f"no C++ compiler found (looked for {name!r}; set CXX or install g++)")
    return path


@functools.lru_cache(maxsize=None)
def _compiler_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.stdout else path


KERNEL_DIR = SOURCE_DIR / "kernels"


def source_files() -> list[pathlib.Path]:
    return sorted(p for p in (*SOURCE_DIR.iterdir(), *KERNEL_DIR.iterdir()) if p.suffix in (".cpp", ".h"))


def kernel_headers() -> list[pathlib.Path]:
    """Every kernel file, in name order (each one's kernels declare themselves with ``QC_KERNEL``)."""
    return sorted(KERNEL_DIR.glob("*.h"))


def cpp_cache() -> pathlib.Path:
    return cache_root() / "cpp"


def content_hash(cxx: str) -> str:
    digest = hashlib.sha256()
    for path in source_files():
        digest.update(path.relative_to(SOURCE_DIR).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    flags = repr((COMMON_FLAGS, sorted(UNIT_FLAGS.items()), LINK_FLAGS))
    digest.update(flags.encode() + _compiler_version(cxx).encode())
    return digest.hexdigest()[:24]


def library_path() -> pathlib.Path:
    """Where the library for the current sources, flags and compiler lives (built or not)."""
    return cpp_cache() / content_hash(compiler()) / LIBRARY_NAME


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise CompilerError(f"compiling {what} failed ({' '.join(command)}):\n{result.stderr[-4000:]}")


def build() -> pathlib.Path:
    """Return the path of the compiled library, compiling it first when the cache does not hold it."""
    global builds_in_this_process
    cxx = compiler()
    target = library_path()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix="build-") as work:
        includes = "".join(f'#include "{header}"\n' for header in kernel_headers())
        pathlib.Path(work, "kernels.inc").write_text(includes)
        objects = []
        jobs = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            for unit, flags in UNIT_FLAGS.items():
                obj = os.path.join(work, unit.replace(".cpp", ".o"))
                objects.append(obj)
                command = [cxx, *COMMON_FLAGS, *flags, f"-I{work}", "-c", str(SOURCE_DIR / unit), "-o", obj]
                jobs.append(pool.submit(_run, command, unit))
            for job in jobs:
                job.result()
        temporary = os.path.join(work, LIBRARY_NAME)
        _run([cxx, *LINK_FLAGS, *objects, "-o", temporary], LIBRARY_NAME)
        os.replace(temporary, target)  # atomic: readers see the old state or the whole library
    builds_in_this_process += 1
    return target
