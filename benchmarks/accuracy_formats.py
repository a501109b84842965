"""Accuracy of the on-the-fly formats on SmolLM2-135M, each beside the peer library whose numbers it gives.

One table (markdown on stdout, progress on stderr, ``--out`` for JSON): scheme, library, bits per weight, perplexity
on the held-out tokens of ``benchmarks/accuracy.py --quick`` (the first 1,024 Macbeth tokens, windows of 512),
change against float, quantization wall time, and how the row runs.

* **Bits per weight** come from the real quantized model: every packed tensor of every quantized linear (codes,
  scales, zeros, nested absmax and offsets) for qcompile rows; every stored tensor for peer rows
  (``accuracy_peers.py``); total bytes x 8 / quantized weights. The lm_head is tied to the embedding and stays float
  in every row (not counted). Per-format constants that are no tensor of a layer (qcompile's NF4 / FP4 tables and
  HIGGS grids) are not counted; bitsandbytes stores its code tables with every layer, which its rows count.
* **Evaluation**: qcompile weight-only rows are fake-quant (``accuracy.fake_quant``: the dequantized weight in an
  ``nn.Linear``, the product of the reference kernel up to summation order); rows that quantize activations
  (``llm-int8``, ``-w8a8``, ``-w6a6``) run the real ``qcompile::linear`` op. Peer rows run the peer's own modules
  (hqq: its dequantized weights).
* **K padding**: SmolLM2's linears have K = 576 (q, k, v, o, gate, up) and 1536 (down); 576 = 9 x 64 is no multiple
  of 128 or 512. The note column names every K a format pads (``int4-g128``: 576 -> 640). HIGGS rows use Hadamard
  blocks of 64 (``-h64``) or 32 (``higgs-4-h32``: 4.5 bits, NF4's), which divide both Ks; the default ``higgs-4``
  (h = 512) would pad 576 to 1024 (7.22 bits per weight at K = 576). torchao's int4 leaves a layer whose K is no
  multiple of its group float, so both torchao int4 rows use groups of 64. quanto picks its own int4 group per
  layer (96 at K = 576, 128 at K = 1536); the qcompile rows use the same per layer.
* **Model dtype**: ``quanto`` and ``torchao`` scheme names carry the dtype the peer computes its scales in. qcompile
  rows take ``-fp32`` where the family has it (the peer's numbers on this float32 model); 2- and 4-bit grids have
  bf16 (the default: the float weight is cast to bfloat16 first) and ``-fp16`` only, so quanto's int4 has a row of
  each beside quanto's float32 row, and torchao's int4 peer runs on a bfloat16 copy (with a float bf16 row).
* Peers without a CPU path have no row: EETQ (CUDA only), transformers' HIGGS (FLUTE, CUDA).

``--weight-mse`` prints instead the relative weight error of each format's round-to-nearest (no evaluation) on
SmolLM2's weights and on all-MiniLM-L6-v2's, whose weights are float: SmolLM2's come from a Q4_1 GGUF (asymmetric
int4 in groups of 32), a grid that formats with small per-row groups nearly reproduce and a rotation destroys.

Usage::

    python benchmarks/accuracy_formats.py [--tokens 1024] [--rows bnb-nf4,higgs-4-h64] [--out results.json]
    python benchmarks/accuracy_formats.py --weight-mse
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling modules, also when loaded by path
import accuracy_peers as peers  # noqa: E402
from accuracy import fake_quant  # noqa: E402

import qcompile  # noqa: E402
from qcompile.evaluate import perplexity  # noqa: E402
from qcompile.models import eval_text, load_smollm2  # noqa: E402
from qcompile.nn import QuantizedLinear  # noqa: E402
from qcompile.schemes import parse_scheme  # noqa: E402
from qcompile.schemes.quanto import quanto_group_size  # noqa: E402

SchemeFor = Callable[[int], str]  # in_features -> scheme name


@dataclasses.dataclass(frozen=True)
class Ours:
    """A qcompile row: ``scheme`` for every linear, or a function of its ``in_features``; RTN via
    ``qcompile.quantize``."""

    scheme: str | SchemeFor

    def scheme_for(self, in_features: int) -> str:
        return self.scheme if isinstance(self.scheme, str) else self.scheme(in_features)

    def recipe(self, sites: list[tuple[str, torch.nn.Linear]]) -> dict:
        by_scheme: dict[str, list[str]] = {}
        for name, module in sites:
            by_scheme.setdefault(self.scheme_for(module.in_features), []).append(name)
        default, *others = by_scheme
        overrides = [{"targets": by_scheme[s], "scheme": s} for s in others]
        return {"default": default, "algorithm": "rtn", "overrides": overrides}

    def __call__(self, base: torch.nn.Module) -> peers.Quantized:
        model = copy.deepcopy(base)
        recipe = self.recipe(peers.linear_sites(model))
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qcompile.quantize(model, recipe, progress_bar=False)
        seconds = time.perf_counter() - start
        layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
        stored = sum(t.numel() * t.element_size() for m in layers for t in m.packed())
        bits = 8 * stored / sum(m.in_features * m.out_features for m in layers)
        padded = sorted({(m.in_features, parse_scheme(m.scheme).padded_in_features(m.in_features)) for m in layers})
        pads = ", ".join(f"K {k} -> {kp}" for k, kp in padded if kp != k)
        real_op = any(parse_scheme(m.scheme).quantizes_activations for m in layers)
        note = "real op" if real_op else "fake-quant"
        return peers.Quantized(fake_quant(model), seconds, bits, f"{note}; {pads}" if pads else note)


def float_model(dtype: torch.dtype) -> Callable[[torch.nn.Module], peers.Quantized]:
    def run(base):
        return peers.Quantized(copy.deepcopy(base).to(dtype), 0.0, float(torch.finfo(dtype).bits), str(dtype)[6:])

    return run


def quanto_int4(in_features: int, dtype: str = "") -> str:
    """The ``quanto-int4`` scheme with quanto's own group for ``in_features`` (``dtype``: ``""`` or ``"-fp16"``)."""
    group = quanto_group_size(in_features)
    return ("quanto-int4" if group is None else f"quanto-int4-g{group}") + dtype


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    library: str
    run: Callable[[torch.nn.Module], peers.Quantized]


P = functools.partial
ROWS: tuple[Row, ...] = (
    Row("float", "-", float_model(torch.float32)),
    Row("nf4-g64", "qcompile", Ours("nf4-g64")),
    Row("bnb-nf4", "qcompile", Ours("bnb-nf4")),
    Row("bnb-nf4", "bitsandbytes", P(peers.bitsandbytes_4bit, quant_type="nf4", double_quant=False)),
    Row("bnb-nf4-dq", "qcompile", Ours("bnb-nf4-dq")),
    Row("bnb-nf4-dq", "bitsandbytes", P(peers.bitsandbytes_4bit, quant_type="nf4", double_quant=True)),
    Row("bnb-fp4", "qcompile", Ours("bnb-fp4")),
    Row("bnb-fp4", "bitsandbytes", P(peers.bitsandbytes_4bit, quant_type="fp4", double_quant=False)),
    Row("bnb-fp4-dq", "qcompile", Ours("bnb-fp4-dq")),
    Row("bnb-fp4-dq", "bitsandbytes", P(peers.bitsandbytes_4bit, quant_type="fp4", double_quant=True)),
    Row("llm-int8", "qcompile", Ours("llm-int8")),
    Row("llm-int8", "bitsandbytes", P(peers.bitsandbytes_int8, threshold=6.0)),
    Row("higgs-2-h64", "qcompile", Ours("higgs-2-h64")),
    Row("higgs-3-h64", "qcompile", Ours("higgs-3-h64")),
    Row("higgs-4-h64", "qcompile", Ours("higgs-4-h64")),
    Row("higgs-4-h32", "qcompile", Ours("higgs-4-h32")),  # 4.5 bits: NF4's
    Row("int4-g128", "qcompile", Ours("int4-g128")),
    Row("int4-g128", "hqq", P(peers.hqq, bits=4, group_size=128)),
    Row("int4-g64", "qcompile", Ours("int4-g64")),
    Row("int4-g64", "hqq", P(peers.hqq, bits=4, group_size=64)),
    Row("mxfp4", "qcompile", Ours("mxfp4")),
    Row("mxfp6-e2m3", "qcompile", Ours("mxfp6-e2m3")),
    Row("mxfp6-e3m2", "qcompile", Ours("mxfp6-e3m2")),
    Row("mxfp6-e2m3-w6a6", "qcompile", Ours("mxfp6-e2m3-w6a6")),
    Row("mxfp8-e4m3", "qcompile", Ours("mxfp8-e4m3")),
    Row("mxfp8-e5m2", "qcompile", Ours("mxfp8-e5m2")),
    Row("mxfp8-e4m3-w8a8", "qcompile", Ours("mxfp8-e4m3-w8a8")),
    Row("quanto-int4-g96/g128", "qcompile", Ours(quanto_int4)),
    Row("quanto-int4-g96/g128-fp16", "qcompile", Ours(P(quanto_int4, dtype="-fp16"))),
    Row("quanto-int4-g96/g128", "optimum-quanto", P(peers.quanto, weights="qint4")),
    Row("quanto-int8-fp32", "qcompile", Ours("quanto-int8-fp32")),
    Row("quanto-int8-fp32", "optimum-quanto", P(peers.quanto, weights="qint8")),
    Row("quanto-fp8-fp32", "qcompile", Ours("quanto-fp8-fp32")),
    Row("quanto-fp8-fp32", "optimum-quanto", P(peers.quanto, weights="qfloat8")),
    Row("eetq-int8", "qcompile", Ours("eetq-int8")),
    Row("torchao-int8-fp32", "qcompile", Ours("torchao-int8-fp32")),
    Row("torchao-int8-fp32", "torchao", P(peers.torchao, config="int8")),
    Row("torchao-int4-g64", "qcompile", Ours("torchao-int4-g64")),
    Row("float (bf16)", "-", float_model(torch.bfloat16)),
    Row("torchao-int4-g64", "torchao", P(peers.torchao, config="int4", group_size=64)),
)


def measure(row: Row, base: torch.nn.Module, eval_ids: torch.Tensor, seq_len: int = 512) -> dict:
    """One row's result; a row that cannot run gives its error as the note (and NaN), not a failed run."""
    result = {"scheme": row.label, "library": row.library}
    try:
        quantized = row.run(base)
        ppl = perplexity(quantized.model, eval_ids, seq_len=seq_len)
    except Exception as error:  # noqa: BLE001  (the table says why a row has no number)
        message = " ".join(str(error).split())[:160]
        return {**result, "bits": math.nan, "ppl": math.nan, "seconds": math.nan,
                "note": f"not run: {type(error).__name__}: {message}"}  # fmt: skip
    return {**result, "bits": quantized.bits, "ppl": ppl, "seconds": quantized.seconds, "note": quantized.note}


def markdown(results: dict) -> str:
    rows = results["rows"]
    float_ppl = next((r["ppl"] for r in rows if r["scheme"] == "float"), math.nan)
    lines = [f"Perplexity, SmolLM2-135M, {results['eval_tokens']} held-out tokens (float {float_ppl:.3f})", "",
             "| scheme | library | bits / weight | perplexity | vs float | quantize time | runs as |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if math.isnan(r["ppl"]):
            cells = (r["scheme"], r["library"], "-", "-", "-", "-", r["note"])
        else:
            change = f"{100 * (r['ppl'] / float_ppl - 1):+.2f} %"
            cells = (r["scheme"], r["library"], f"{r['bits']:.3f}", f"{r['ppl']:.3f}", change, f"{r['seconds']:.1f} s",
                     r["note"])  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


MSE_SCHEMES = ("int4-g32", "int4-g64", "int4-g128", "nf4-g64", "bnb-nf4-dq", "mxfp4", "higgs-4-h64", "higgs-4-p1-h64",
               "higgs-4-h32", "higgs-3-h64", "mxfp6-e2m3", "mxfp8-e4m3")  # fmt: skip


def weight_mse(weights: list[torch.Tensor], schemes=MSE_SCHEMES) -> list[dict]:
    """Relative weight error ``sum (W - W_hat)**2 / sum W**2`` (float64) and bits per weight of each scheme's RTN
    over ``weights`` (float ``[N, K]`` each): the quantity HIGGS's grids minimize, free of any model's evaluation."""
    rows = []
    for name in schemes:
        scheme, start = parse_scheme(name), time.perf_counter()
        error = total = stored = count = 0
        for w in weights:
            packed = scheme.pack(scheme.quantize(w))
            w_hat = scheme.dequantize(scheme.unpack(packed, w.shape[1])).double()
            error += float((w_hat - w.double()).pow(2).sum())
            total += float(w.double().pow(2).sum())
            stored, count = stored + packed.nbytes, count + w.numel()
        rows.append({"scheme": name, "bits": 8 * stored / count, "rel_mse": error / total,
                     "seconds": time.perf_counter() - start})  # fmt: skip
    return rows


def mse_markdown(tables: dict[str, list[dict]]) -> str:
    """One row per scheme; bits per weight and relative error for each weight set (the Ks differ, so may the bits)."""
    names = list(tables)
    header = "".join(f" bits, {n} | relative MSE, {n} |" for n in names)
    lines = ["| scheme |" + header, "|---|" + "---|---|" * len(names)]
    for i, r in enumerate(tables[names[0]]):
        cells = "".join(f" {tables[n][i]['bits']:.3f} | {tables[n][i]['rel_mse']:.3e} |" for n in names)
        lines.append(f"| {r['scheme']} |" + cells)
    return "\n".join(lines)


def mse_main(base: torch.nn.Module) -> None:
    """``--weight-mse``: the MSE table on SmolLM2's layers 0, 15, 29 (from a Q4_1 GGUF) and on all-MiniLM-L6-v2's
    linears (float weights from safetensors; K = 384 and 1536)."""
    from qcompile.models import load_minilm

    smollm2 = [m.weight.detach().float() for name, m in peers.linear_sites(base)
               if any(f"layers.{i}." in name for i in (0, 15, 29))]  # fmt: skip
    minilm = [m.weight.detach().float() for _, m in peers.linear_sites(load_minilm()[0])]
    tables = {"SmolLM2 layers 0, 15, 29": weight_mse(smollm2), "all-MiniLM-L6-v2": weight_mse(minilm)}
    print(mse_markdown(tables))


def select(labels: str | None) -> tuple[Row, ...]:
    if not labels:
        return ROWS
    wanted = labels.split(",")
    unknown = [w for w in wanted if w not in {r.label for r in ROWS}]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; rows: {', '.join(dict.fromkeys(r.label for r in ROWS))}")
    return tuple(r for r in ROWS if r.label in wanted or r.label == "float")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="held-out tokens (default 1024, as accuracy --quick)")
    parser.add_argument("--rows", help="comma-separated scheme labels (float always runs)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--weight-mse", action="store_true", help="print the relative weight MSE table instead")
    args = parser.parse_args(argv)
    rows = select(args.rows)
    torch.manual_seed(0)
    start = time.perf_counter()
    base, tokenizer = load_smollm2()
    print(f"loaded SmolLM2-135M in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    if args.weight_mse:
        return mse_main(base)
    eval_ids = torch.tensor(tokenizer.encode(eval_text())[: args.tokens])
    results = {"eval_tokens": int(eval_ids.numel()), "rows": []}
    for row in rows:
        r = measure(row, base, eval_ids)
        results["rows"].append(r)
        print(f"{r['scheme']:>22} {r['library']:>15} {r['bits']:7.3f} b  ppl {r['ppl']:9.3f}  {r['seconds']:6.1f}s  "
              f"{r['note']}", file=sys.stderr, flush=True)  # fmt: skip
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=2)
    print(markdown(results))


if __name__ == "__main__":
    main()
