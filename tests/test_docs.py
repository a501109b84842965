"""Docs name only paths that exist (README.md and docs/*.md)."""

import re
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
