"""docs/onnx.md names only paths that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_paths_in_onnx_doc_exist():
    text = (ROOT / "docs" / "onnx.md").read_text(encoding="utf-8")
    paths = set(re.findall(r"`((?:qcompile|tests|benchmarks|docs|passes|runtime|codegen)/[\w/.]*)`", text))
    assert paths, "the doc should name its source files"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"docs/onnx.md names paths that do not exist: {missing}"
