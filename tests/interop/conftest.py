"""llama.cpp interoperability (``make interop``): llama.cpp's own tools read the GGUF files qcompile loads and writes.

Every test here is marked ``llama_cpp`` and runs only when asked for by name (``-m llama_cpp``, as ``make interop``
does); any other run deselects them, so ``make test`` never builds llama.cpp. The tools come from
``$LLAMA_CPP_BIN`` when set, else from ``tools/llama_cpp.sh`` (builds once, then answers from its cache). The run
ends with a table of what was compared, file by file.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
MARK = "llama_cpp"
REPORT = pytest.StashKey[dict]()
COLUMNS = ("tokens", "ppl_llama", "ppl_ours", "kl", "top1", "greedy")


def pytest_collection_modifyitems(config, items):
    if MARK in (config.getoption("markexpr") or ""):
        return
    ours = [item for item in items if Path(str(item.fspath)).resolve().is_relative_to(HERE)]
    if ours:
        config.hook.pytest_deselected(items=ours)
        items[:] = [item for item in items if item not in ours]


def pytest_terminal_summary(terminalreporter, config):
    rows = config.stash.get(REPORT, {})
    if not rows:
        return
    terminalreporter.section("llama.cpp against qcompile, same files")
    terminalreporter.write_line(" | ".join(("file", *COLUMNS)))
    for name, row in rows.items():
        cells = [f"{row[c]:.4f}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in COLUMNS]
        terminalreporter.write_line(" | ".join((name, *cells)))


def llama_bin_dir() -> Path:
    """The folder holding ``llama-perplexity``, ``llama-bench``, ``llama-simple`` and ``llama-tokenize``."""
    given = os.environ.get("LLAMA_CPP_BIN")
    if given:
        return Path(given)
    done = subprocess.run([str(ROOT / "tools" / "llama_cpp.sh")], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"tools/llama_cpp.sh failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def llama_bin() -> Path:
    folder = llama_bin_dir()
    missing = [t for t in ("llama-perplexity", "llama-simple", "llama-tokenize") if not (folder / t).exists()]
    assert not missing, f"llama.cpp tools missing in {folder}: {missing}"
    return folder


@pytest.fixture(scope="session")
def report(request) -> dict:
    """``file -> {column: value}`` (columns ``COLUMNS``), printed at the end of the run."""
    return request.config.stash.setdefault(REPORT, {})
