"""The GPU benchmark scripts that have a CPU mode run here, so a GPU session finds them working.

``gpu_forms.py --tiny`` runs every int4 kernel form under the Triton interpreter and exits non-zero when one
disagrees with the reference op; ``triton_launch.py`` times the launchers with the kernel launches stubbed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run(script: str, *args: str, interpret: bool) -> str:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=BENCHMARKS, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_gpu_forms_tiny_agrees_with_the_reference():
    out = run("gpu_forms.py", "--tiny", interpret=True)
    rows = [line for line in out.splitlines() if line.startswith("| int4")]
    assert len(rows) == 2 * (5 + 5 + 3 + 2), out  # both schemes: M=1 and 4 five forms, M=16 three, M=33 two
    assert {row.split(" | ")[2] for row in rows} >= {"GEMV words", "dot words (16 rows)", "GEMM dot words"}


def test_triton_launch_overhead_table():
    out = run("triton_launch.py", "--calls", "20", "--repeats", "2", interpret=False)
    rows = [line.strip("| ").split(" | ") for line in out.splitlines()[3:]]
    assert [row[0] for row in rows] == ["int4-g128", "int8", "w8a8"], out
    for row in rows:
        assert float(row[1]) > 0 and float(row[2]) > 0


def test_gpu_forms_counts_a_nan_form_as_a_failure():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_forms", BENCHMARKS / "gpu_forms.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert module.worse(0.0, float("nan")) == float("inf")
    assert module.worse(float("inf"), 1e-3) == float("inf")
    assert module.worse(1e-4, 1e-3) == 1e-3
