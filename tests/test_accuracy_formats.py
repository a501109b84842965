"""``benchmarks/accuracy_formats.py`` on a tiny random Llama: its row list parses, rows run, bits per weight are what
the packed tensors hold, and a qcompile row and bitsandbytes' own row on the same weights give the same perplexity."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import torch

from qcompile.models import tiny_llama
from qcompile.nn import QuantizedLinear
from qcompile.schemes import parse_scheme

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy_formats.py"
PEERS = {"-", "bitsandbytes", "hqq", "optimum-quanto", "torchao"}
SMOLLM2_K = (576, 1536)


def load_script():
    name = "benchmarks_accuracy_formats"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


bench = load_script()


def _tiny():
    # intermediate 128: every K a multiple of bitsandbytes' block of 64 (its CPU dequantizer reads absmax per row
    # otherwise); layers: q/o 64x64, k/v 32x64, gate/up 128x64, down 64x128
    ids = torch.randint(0, 128, (97,), generator=torch.Generator().manual_seed(5))
    return tiny_llama(seed=3, intermediate=128), ids


def _weights_and_rows(model):
    sites = bench.peers.linear_sites(model)
    return sum(m.in_features * m.out_features for _, m in sites), sum(m.out_features for _, m in sites)


def test_row_list_parses():
    labels = [(r.label, r.library) for r in bench.ROWS]
    assert len(labels) == len(set(labels))
    required = {"nf4-g64", "bnb-nf4", "bnb-nf4-dq", "bnb-fp4", "bnb-fp4-dq", "llm-int8", "higgs-2-h64", "higgs-3-h64",
                "higgs-4-h64", "int4-g128", "mxfp4", "mxfp6-e2m3", "mxfp6-e3m2", "mxfp8-e4m3", "mxfp8-e5m2",
                "quanto-int4-g96/g128", "quanto-int8-fp32", "eetq-int8", "torchao-int4-g64", "torchao-int8-fp32"}
    assert required <= {label for label, library in labels if library == "qcompile"}
    for row in bench.ROWS:
        assert row.library in PEERS | {"qcompile"}, row
        if row.library != "qcompile":
            continue
        names = {parse_scheme(row.run.scheme_for(k)).name for k in SMOLLM2_K}
        if isinstance(row.run.scheme, str):
            assert names == {row.label}
    assert [bench.quanto_int4(k) for k in SMOLLM2_K] == ["quanto-int4-g96", "quanto-int4-g128"]
    # the padding the docstring states for K = 576
    assert parse_scheme("int4-g128").padded_in_features(576) == 640
    assert parse_scheme("higgs-4-h64").padded_in_features(576) == 576
    assert parse_scheme("higgs-4").padded_in_features(576) == 1024


def test_qcompile_bnb_row_equals_bitsandbytes_row():
    model, ids = _tiny()
    weights, _ = _weights_and_rows(model)
    ours = bench.measure(bench.Row("bnb-nf4", "qcompile", bench.Ours("bnb-nf4")), model, ids, seq_len=32)
    peer_row = next(r for r in bench.ROWS if r.label == "bnb-nf4" and r.library == "bitsandbytes")
    theirs = bench.measure(peer_row, model, ids, seq_len=32)
    assert ours["bits"] == 4.5 and ours["note"] == "fake-quant"  # 4-bit codes + a float32 absmax per 64
    # bitsandbytes also stores its 16-entry float32 table and its quant-state bytes with each of the 14 layers
    extra = theirs["bits"] - 4.5
    assert 14 * 64 * 8 / weights < extra < 14 * (64 + 200) * 8 / weights
    assert math.isfinite(ours["ppl"]) and abs(ours["ppl"] / theirs["ppl"] - 1) < 1e-5
    plain = bench.measure(bench.ROWS[0], model, ids, seq_len=32)
    assert plain["bits"] == 32 and ours["ppl"] != plain["ppl"]
    table = bench.markdown({"eval_tokens": ids.numel(), "rows": [plain, ours, theirs]})
    assert "| bnb-nf4 | bitsandbytes | " in table and f"{ours['ppl']:.3f}" in table


def test_activation_rows_run_the_real_op_and_count_scales():
    model, ids = _tiny()
    weights, rows = _weights_and_rows(model)
    quantized = bench.Ours("llm-int8")(model)
    assert sum(isinstance(m, QuantizedLinear) for m in quantized.model.modules()) == 14
    assert quantized.bits == (8 * weights + 32 * rows) / weights and quantized.note == "real op"
    weight_only = bench.Ours("int4-g128")(model)
    assert not any(isinstance(m, QuantizedLinear) for m in weight_only.model.modules())
    # K 64 and 128 both pad to one group of 128: codes 4 bits x 128, float32 scale and zero per row
    padded = sum(m.out_features * 128 for _, m in bench.peers.linear_sites(model))
    assert weight_only.bits == (4 * padded + 64 * rows) / weights
    assert weight_only.note == "fake-quant; K 64 -> 128"


def test_peer_int8_bits_and_a_row_that_cannot_run():
    model, ids = _tiny()
    weights, rows = _weights_and_rows(model)
    torchao_row = next(r for r in bench.ROWS if r.label == "torchao-int8-fp32" and r.library == "torchao")
    quantized = torchao_row.run(model)
    # int8 codes, a float32 scale and an int8 zero point (all 0, stored all the same) per row
    assert quantized.bits == (8 * weights + 40 * rows) / weights
    failed = bench.measure(bench.Row("no-such", "qcompile", bench.Ours("int5-g7x")), model, ids, seq_len=32)
    assert math.isnan(failed["ppl"]) and failed["note"].startswith("not run: ") and "int5-g7x" in failed["note"]


def test_weight_mse_table():
    """On Gaussian weights HIGGS-4 (p = 2) has a lower error than NF4 at fewer bits (the published claim); a weight
    on the int4-g32 grid (as SmolLM2's Q4_1 weights are) comes back from int4-g32 up to float32 rounding."""
    g = torch.Generator().manual_seed(7)
    gaussian = [torch.randn(64, 512, generator=g), torch.randn(32, 192, generator=g)]
    rows = {r["scheme"]: r for r in bench.weight_mse(gaussian, ("nf4-g64", "higgs-4-h64", "int4-g32"))}
    assert rows["nf4-g64"]["bits"] == 4.5 and rows["higgs-4-h64"]["bits"] == 4.25
    assert rows["higgs-4-h64"]["rel_mse"] < 0.95 * rows["nf4-g64"]["rel_mse"]
    on_grid = parse_scheme("int4-g32")
    grid_weights = [on_grid.dequantize(on_grid.quantize(w)) for w in gaussian]
    assert bench.weight_mse(grid_weights, ("int4-g32",))[0]["rel_mse"] < 1e-12
    table = bench.mse_markdown({"a": list(rows.values()), "b": list(rows.values())})
    assert table.splitlines()[0] == "| scheme | bits, a | relative MSE, a | bits, b | relative MSE, b |"
    assert f"| higgs-4-h64 | 4.250 | {rows['higgs-4-h64']['rel_mse']:.3e} | 4.250 |" in table
