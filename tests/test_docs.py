"""Docs name only paths that exist (README.md and docs/*.md)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# a backticked token that looks like a repository path: has a slash or a known file suffix, no spaces
PATH = re.compile(r"`([A-Za-z0-9_.\-/]+(?:/|\.py|\.md|\.toml|\.cpp|\.h|\.txt))`")
NOT_REPO_PATHS = ("~/", "/tmp", "/etc", "../", "model.", "SmolLM2", "http")


def _candidates(text):
    for match in PATH.finditer(text):
        token = match.group(1)
        if token.startswith(NOT_REPO_PATHS) or token.startswith("/"):
            continue
        yield token


SOURCE_DIRS = ("qcompile", "passes", "codegen", "runtime", "tests", "benchmarks", "docs")


def _exists_somewhere(name: str) -> bool:
    """A bare file or folder name (``ops.py``, ``cpp/``) written in a table row that gives its folder."""
    name = name.rstrip("/")
    return any(any(True for _ in (ROOT / d).rglob(name)) for d in SOURCE_DIRS)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_doc_paths_exist(doc):
    missing = []
    for token in _candidates(doc.read_text(encoding="utf-8")):
        candidates = [ROOT / token, ROOT / "qcompile" / token, doc.parent / token]
        bare = "/" not in token.rstrip("/")
        if not any(c.exists() for c in candidates) and not (bare and _exists_somewhere(token)):
            missing.append(token)
    assert not missing, f"{doc.relative_to(ROOT)} names paths that do not exist: {missing}"


def test_readme_quick_start_is_two_make_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## Quick start", 1)[1].split("```", 2)[1]
    commands = [line.split("#")[0].strip() for line in block.splitlines()[1:] if line.strip()]
    assert commands == ["make demo", "make test"]


#: documents whose ``python`` blocks are run as written (each in a fresh process, in an empty folder)
RUNNABLE = [ROOT / "README.md", ROOT / "docs" / "formats.md"]


def _python_blocks():
    for doc in RUNNABLE:
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), re.S)):
            yield pytest.param(block, id=f"{doc.name}[{i}]")


@pytest.mark.parametrize("block", list(_python_blocks()))
def test_python_blocks_run_as_written(block, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
