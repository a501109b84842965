"""What the GPU would run: the Triton kernels compiled for sm_90 on this machine (``codegen/triton/asm.py``).

No GPU is needed: triton's NVIDIA backend and its ``ptxas``/``cuobjdump`` compile and disassemble on any host. The
properties pinned here decide the memory-bound speed of the decode kernels, and each was once wrong: packed weight
bytes loaded one at a time (the loop offsets' alignment was unknown to the compiler), and a GEMV spending 24
instructions a weight byte. Compilation runs in a subprocess, since the other kernel tests import triton with
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = """
import json
from qcompile.codegen.triton import asm
from qcompile.codegen.triton.autotune import KernelConfig as C
cases = [
    asm.Case("int4", "int4-g128", "gemv", 1, 1024, 512, C(1, 128, 128, split_k=8, num_stages=2, words=1)),
    asm.Case("int4", "int4-g128-sym", "gemv", 1, 1024, 512, C(1, 256, 128, split_k=4, num_stages=2, words=1)),
    asm.Case("int4", "int4-g128", "gemv", 1, 1024, 512, C(1, 64, 128, split_k=4, num_stages=2)),
    asm.Case("int4", "int4-g128", "gemm", 64, 1024, 512, C(64, 128, 64, num_warps=4, num_stages=3)),
    asm.Case("int4", "int4-g128", "splitk", 16, 1024, 512, C(16, 128, 128, split_k=4, num_stages=3)),
    asm.Case("int4", "int4-g128", "splitk", 16, 1024, 512, C(16, 128, 128, split_k=4, num_stages=3, words=1)),
    asm.Case("int4", "int4-g128-sym", "splitk", 16, 1024, 512, C(16, 128, 128, split_k=4, num_stages=3, words=1)),
    asm.Case("int4", "int4-g128-sym", "splitk", 16, 1024, 512, C(16, 128, 128, split_k=4, num_stages=3, words=2)),
    asm.Case("w8a16", "int8", "gemv", 1, 1024, 512, C(1, 64, 128, split_k=4, num_stages=2, words=1)),
    asm.Case("int4", "int4-g128", "gemm", 256, 1024, 512, C(128, 128, 128, num_warps=8, num_stages=3, words=1)),
    asm.Case("int4", "int4-g128-sym", "gemm", 256, 1024, 512, C(128, 128, 128, num_warps=8, num_stages=3, words=1)),
]
print(json.dumps({case.label: asm.report_rows([case])[-1] for case in cases}))  # the last launch: after tile sums
"""


@pytest.fixture(scope="module")
def rows() -> dict:
    from qcompile.codegen.triton import asm

    if not os.path.exists(os.path.join(os.path.dirname(asm.triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton ships no NVIDIA backend tools")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_weight_tiles_load_16_bytes_at_once(rows):
    """No kernel loads packed weights byte by byte: GEMVs issue 16-byte global loads, dot kernels copy tiles
    asynchronously (no plain global load of the weight at all)."""
    for label, row in rows.items():
        assert not any(variant.endswith((".b8", ".u8", ".s8")) for variant in row["loads"]), (label, row["loads"])
        if "gemv" in label:
            assert "ld.global.v4.b32" in row["loads"], (label, row["loads"])


def test_no_register_spills(rows):
    for label, row in rows.items():
        assert row["spills"] == 0, (label, row)


def test_int4_gemv_words_instruction_budget(rows):
    """The word GEMV's hot loop: one AND and one FMA a nibble plus the shared activation work, so about 6 to 8
    instructions a packed weight byte, against 24 for the first kernels (the byte form is about 15)."""
    per_byte = {label: row["instructions_per_weight_byte"] for label, row in rows.items() if "gemv" in label}
    words = [value for label, value in per_byte.items() if "int4" in label and label.endswith("words")]
    assert words and max(words) < 9.0, per_byte
    assert min(words) < per_byte[next(label for label in per_byte if label.endswith("bytes"))], per_byte


def test_int4_dot_words_instruction_budget(rows):
    """The word-form dot makes exact 16-bit codes with a shift and two logic operations per pair of nibbles and
    scales the tile's product once: cheaper than dequantizing every weight in fp32 (the byte form), about 7
    instructions a packed weight byte when symmetric (no activation sum), 9 when not."""
    per_byte = {label: row["instructions_per_weight_byte"] for label, row in rows.items() if "splitk" in label}
    bytes_form = per_byte[next(label for label in per_byte if label.endswith("bytes"))]
    symmetric = per_byte[next(label for label in per_byte if "-sym " in label and label.endswith("words"))]
    asymmetric = per_byte[next(label for label in per_byte if label.endswith("words") and "-sym " not in label)]
    assert symmetric < 8.5 and asymmetric < 10.5, per_byte
    assert symmetric < asymmetric < bytes_form, per_byte


def test_int4_dot_planes_skip_shared_memory(rows):
    """The plane form feeds each plane's codes to the tensor cores from registers: no shared-memory staging of the
    codes, so it needs well under the word form's shared memory, at about the same instructions (triton 3.7.1:
    0.99x; 3.6.0: 1.05x, symmetric)."""
    words = next(row for label, row in rows.items() if "-sym splitk" in label and label.endswith("words"))
    planes = next(row for label, row in rows.items() if "-sym splitk" in label and label.endswith("planes"))
    assert planes["shared_kb"] < 0.6 * words["shared_kb"], (planes, words)
    assert planes["instructions_per_weight_byte"] <= 1.1 * words["instructions_per_weight_byte"], (planes, words)


def test_int4_asymmetric_gemm_costs_what_symmetric_does(rows):
    """Past 16 rows the asymmetric word-form dot subtracts its zero terms after the K loop, in dots over the tiles'
    activation sums, so its main loop is the symmetric one's (sm_90, triton 3.7.1: 11.5 against 11.4 instructions
    a byte at 128 x 128 tiles; with an FMA per output element in every tile it was 15.3)."""
    gemm = {label: row for label, row in rows.items() if " gemm M=256 " in label}
    symmetric = next(row for label, row in gemm.items() if "-sym " in label)
    asymmetric = next(row for label, row in gemm.items() if "-sym " not in label)
    assert asymmetric["instructions_per_weight_byte"] <= 1.05 * symmetric["instructions_per_weight_byte"], gemm
    assert asymmetric["spills"] == 0
