"""``benchmarks/accuracy_lowbit.py`` on a one-block random Llama: the row list covers every method at the bits the
table groups it in, rows run one method per scheme family, and bits per weight are what each family's layout
stores (written here from the layouts in docs/formats.md, not from the scheme's tensor specs)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from qcompile.models import tiny_llama
from qcompile.schemes import parse_scheme

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy_lowbit.py"


def load_script():
    name = "benchmarks_accuracy_lowbit"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


bench = load_script()
# one block: q, o 64 x 64; k, v 32 x 64; gate, up 128 x 64; down 64 x 128 ([N, K])
SHAPES = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
WEIGHTS = sum(n * k for n, k in SHAPES)


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(seed=3, layers=1, intermediate=128)
    ids = torch.randint(0, 128, (400,), generator=torch.Generator().manual_seed(5))
    windows = bench.calibration_windows(ids[:200], 4, 32)
    return model, windows, ids[200:297]


def _row(method, scheme, **options):
    row = next(r for r in bench.ROWS if r.method == method and r.scheme == scheme)
    return dataclasses.replace(row, options=row.options + tuple(options.items()))


def test_rows_cover_every_method_and_group():
    rows = {(r.bits, r.method): r.scheme for r in bench.ROWS}
    assert len(rows) == len(bench.ROWS)
    for method in ("rtn", "gptq", "autoround"):
        assert [rows[(b, method)] for b in (2, 3, 4)] == ["int2-g64", "int3-g128", "int4-g128"]
    assert rows[(2, "hqq")] == "int2-g64" and rows[(3, "hqq")] == "int3-g128"
    assert rows[(3, "awq")] == "int3-g128" and rows[(4, "awq")] == "int4-g128"
    assert rows[(2, "aqlm")] == "aqlm-2x8" and rows[(3, "aqlm")] == "aqlm-3x8"
    assert rows[(2, "vptq")] == "vptq-v4-k256" and rows[(3, "vptq")] == "vptq-v4-k256-r16"
    assert rows[(4, "spqr")] == "spqr-3"
    assert rows[(2, bench.PACKAGE)] == "int2-g64" and rows[(4, bench.PACKAGE)] == "int4-g128"
    for r in bench.ROWS:
        if r.method != bench.PACKAGE:
            parse_scheme(r.scheme)  # every scheme name parses
        if "autoround" in r.method:
            assert dict(r.options) == {"preset": "light"}
    # index bits of the codebook rows: 2 x 8 / 8, 3 x 8 / 8; 8 / 4, (8 + 4) / 4
    assert [bench.select((2, 3), ("aqlm", "vptq"))[i].scheme for i in range(4)] == [
        "aqlm-2x8", "vptq-v4-k256", "aqlm-3x8", "vptq-v4-k256-r16"]  # fmt: skip
    with pytest.raises(SystemExit, match="unknown \\['quip'\\]"):
        bench.select((2,), ("quip",))
    with pytest.raises(SystemExit, match="unknown \\['5'\\]"):
        bench.select((5,), ("rtn",))


def test_integer_rows_bits(setup):
    model, windows, ids = setup
    rtn = bench.measure(_row("rtn", "int4-g128"), model, None, windows, ids, seq_len=32)
    # K 64 and 128 pad to one group of 128; 4-bit codes, float32 scale and zero per row and group
    assert rtn["bits"] == sum(n * (4 * 128 + 64) for n, _ in SHAPES) / WEIGHTS
    assert rtn["note"] == "7 layers, fake-quant" and math.isfinite(rtn["ppl"])
    auto = bench.measure(_row("autoround", "int2-g64"), model, None, windows, ids, iters=2, seq_len=32)
    assert auto["bits"] == 3.0 and auto["method"] == "autoround (2 iters)"  # 2 + (32 + 32) / 64, no padding
    plain = bench.float_row(model, ids, seq_len=32)
    assert auto["ppl"] != plain["ppl"] and math.isfinite(auto["ppl"])


def test_codebook_and_outlier_rows_bits(setup):
    model, windows, ids = setup
    row = _row("aqlm", "aqlm-2x8", force=True, iters=1, cg_steps=2)
    aqlm = bench.measure(row, model, None, windows, ids, seq_len=32)
    # int8 codes [N, K/8, 2], float16 codebooks [2, 256, 1, 8] and scales [N] per layer
    assert aqlm["bits"] == sum(8 * (n * k // 8 * 2) + 16 * 2 * 256 * 8 + 16 * n for n, k in SHAPES) / WEIGHTS
    row = _row("vptq", "vptq-v4-k256-r16", force=True, kmeans_iters=2, refit_steps=1)
    vptq = bench.measure(row, model, None, windows, ids, seq_len=32)
    # int32 words of 12-bit indices per vector row of 4, float16 codebooks of 256 and 16 x 4, 3 x 16 bits per column
    words = sum(32 * (n // 4) * math.ceil(k * 12 / 32) + 16 * (256 + 16) * 4 + 48 * k for n, k in SHAPES)
    assert vptq["bits"] == words / WEIGHTS
    spqr = bench.measure(_row("spqr", "spqr-3"), model, None, windows, ids, seq_len=32)
    # one int64 word per 16 weights, int32 row offsets [N + 1] and permutation [K / 2], 32 bits per outlier
    dense = sum(4 * n * k + 32 * (n + 1 + k // 2) for n, k in SHAPES)
    outliers = (spqr["bits"] * WEIGHTS - dense) / 32
    assert outliers == int(outliers) and 0 <= outliers < 0.05 * WEIGHTS
    for r in (aqlm, vptq, spqr):
        assert math.isfinite(r["ppl"]) and r["note"] == "7 layers, fake-quant", r


def test_refused_row_names_the_layer_and_the_table(setup):
    model, windows, ids = setup
    refused = bench.measure(_row("aqlm", "aqlm-2x8"), model, None, windows, ids, seq_len=32)
    assert math.isnan(refused["ppl"]) and refused["note"].startswith("not run: ValueError: site model.layers.0.")
    assert "force: true" in refused["note"]
    plain = bench.float_row(model, ids, seq_len=32)
    table = bench.markdown({"eval_tokens": ids.numel(), "samples": 4, "seq_len": 32, "rows": [plain, refused]})
    assert table.splitlines()[-1].startswith("| ~2 | aqlm | aqlm-2x8 | - | - | - | - | not run: ")
    assert f"(float {plain['ppl']:.3f})" in table.splitlines()[0]


def test_package_bits_formula():
    model = tiny_llama(seed=3, layers=1, intermediate=128)
    # W4G128: K pads to 128; per group 128 x 4 bits of codes, a float16 scale and a 4-bit zero
    assert bench.package_bits(model, 4, 128) == sum(n * (128 * 4 + 16 + 4) for n, _ in SHAPES) / WEIGHTS
    assert bench.package_bits(model, 2, 64) == 2 + (16 + 2) / 64
