"""The per-layer report: kernel per layer from the dispatch table, error recomputed independently, JSON and PNG."""

import json

import pytest
import torch

from qcompile.layer_report import layer_report
from qcompile.models import tiny_llama

RECIPE = {"default": "int4-g32", "overrides": [{"targets": ["*.down_proj"], "scheme": "int8"},
                                               {"targets": ["*.v_proj"], "scheme": "nf4-g32"}]}  # fmt: skip


def _inputs():
    return [{"input_ids": torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(i))} for i in (0, 1)]


@pytest.fixture(scope="module")
def report():
    return layer_report(tiny_llama(), RECIPE, _inputs())


def test_error_is_the_layers_own_output_error(report):
    model = tiny_llama()
    site = "model.layers.1.mlp.down_proj"
    captured = []
    handle = model.get_submodule(site).register_forward_hook(lambda m, a, o: captured.append(a[0].reshape(-1, 96)))
    with torch.no_grad():
        for inputs in _inputs():
            model(**inputs)
    handle.remove()
    x = torch.cat(captured).double()
    weight = model.get_submodule(site).weight.detach()
    absmax = weight.abs().amax(1, keepdim=True).double()
    dequantized = torch.round(weight.double() / (absmax / 127)).clamp(-127, 127) * (absmax / 127)  # int8 per row
    exact = x @ weight.double().t()
    expected = ((x @ dequantized.t() - exact).norm() / exact.norm()).item()
    row = next(r for r in report.rows if r.site == site)
    assert row.error == pytest.approx(expected, rel=1e-3)


def test_kernel_column_names_the_row_or_why_the_reference(report):
    rows = {r.site: r for r in report.rows}
    assert rows["model.layers.0.mlp.down_proj"].kernels[1].startswith("cpp-w8a16")
    assert rows["model.layers.0.self_attn.q_proj"].kernels[128].startswith("cpp-w4a16")
    nf4 = rows["model.layers.0.self_attn.v_proj"].kernels[1]
    assert nf4.startswith("reference (") and "nf4" in nf4  # no kernel row for NF4 on CPU: said, with the reason
    assert rows["lm_head"].kernels[1] == "kept float" and rows["lm_head"].error is None
    assert rows["model.layers.0.mlp.down_proj"].bits_per_weight == pytest.approx(8 + 32 / 96)


def test_table_json_and_plot(report, tmp_path):
    table = report.table()
    assert "kernel M=1" in table and "rel. error" in table and "model.layers.1.mlp.up_proj" in table
    data = json.loads(report.to_json())
    assert len(data["rows"]) == 15 and data["rows"][0]["kernels"]["1"]
    pytest.importorskip("matplotlib")
    report.plot(tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
