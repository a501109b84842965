"""Perplexity of SmolLM2-135M at about 2, 3 and 4 bits per weight, for every calibration method qcompile has.

One table (markdown on stdout, progress on stderr, ``--out`` for JSON), rows grouped by their nominal bits:

* ~2 bits: RTN, GPTQ, HQQ, AutoRound at ``int2-g64``; AQLM ``aqlm-2x8``; VPTQ ``vptq-v4-k256``; the ``auto-round``
  package at W2G64;
* ~3 bits: RTN, GPTQ, AWQ, HQQ, AutoRound at ``int3-g128``; AQLM ``aqlm-3x8``; VPTQ ``vptq-v4-k256-r16``;
* ~4 bits: RTN, GPTQ, AWQ, AutoRound at ``int4-g128``; SpQR ``spqr-3``; the ``auto-round`` package at W4G128.

**Bits per weight** are counted as in ``benchmarks/accuracy_formats.py``: every packed tensor of every quantized
linear (codes, scales, zeros, codebooks, outlier values and their indices, permutations), total bytes x 8 / quantized
weights. The lm_head is tied to the embedding and stays float in every row (not counted). So ``int2-g64`` counts
2 + 64 / 64 = 3 bits (float32 scale and zero per 64), ``int4-g128`` 4 x 640 / 576 + 64 / 128 on K = 576 (padded to
640). Codebook sizes for SmolLM2's 576-wide layers (k/v are 192 x 576): ``aqlm-2x8`` stores 2 x 256 x 8 float16
entries per layer, ``aqlm-3x8`` three; ``vptq-v4-k256`` 256 x 4 (2 bits of indices), ``-r16`` adds 4 bits per vector
of 4 (3 bits); an ``aqlm-1x12-g4`` or ``vptq-v4-k4096`` codebook (4096 entries) would cost 2.4 bits more on k/v.

**Calibration**: ``samples`` windows of ``seq_len`` tokens of The Tempest (:func:`qcompile.models.calibration_text`,
tokenized once), the same token tensors for every method and for the ``auto-round`` package. **Evaluation**: the
first ``tokens`` held-out Macbeth tokens (:func:`qcompile.models.eval_text`), windows of 512, as
``benchmarks/accuracy.py``. Weight-only rows are fake-quant (``accuracy.fake_quant``: the dequantized weight in an
``nn.Linear``, the product of the reference kernel up to summation order).

**AutoRound** rows use the ``light`` preset (50 SignSGD steps per block) unless ``--autoround-iters`` says otherwise
(the row's label then names the steps). The ``auto-round`` package (``pip install --no-deps auto-round
py-cpuinfo``) runs with the same steps, calibration windows, batch size 8 and ``lr = 1 / iters``, on CPU, in its
fake-quant form (``ar.quantize()``; its ``model`` holds the quantize-dequantized weights). Its bits are those of its
``auto_round`` export (int32-packed codes and zeros, float16 scales per group): ``b + (16 + b) / g``, on K padded to
the group. ``datasets`` (pyarrow, pandas) is imported by ``auto_round`` at load time but only used for hub data
sets: when it is not installed an empty stand-in module is put in its place (the row's note says so).

**Cost**, measured with ``--quick`` on a 2-core CPU shared with other jobs (load average 4 to 9, so several times a
quiet machine's): RTN 15-140 s a row; GPTQ 200-600 s; HQQ int2-g64 1,235 s; AutoRound at 20 steps 20-70 s per block
(20 minutes a row; the light preset's 50 steps, about 2.5 times that), the package about the same; VPTQ's calibration
pass 80-170 s per block (17 s on a quiet machine), then its 210 layers took more than 4 more minutes; AQLM finished
fewer than 3 of 30 calibration blocks of ``aqlm-2x8`` in 29 minutes. ``--quick`` uses 1,024 evaluation
tokens and 4 x 128 calibration tokens (fewer calibration tokens than SmolLM2's K = 1536 of down_proj: GPTQ-style
Hessians are then rank-deficient up to the damping).

Usage::

    python benchmarks/accuracy_lowbit.py [--bits 2,3,4] [--methods rtn,gptq,...] [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import sys
import time
import types
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling modules, also when loaded by path
from accuracy import fake_quant  # noqa: E402

import qcompile  # noqa: E402
from qcompile.evaluate import perplexity  # noqa: E402
from qcompile.nn import QuantizedLinear  # noqa: E402

PACKAGE = "auto-round (package)"
METHODS = ("rtn", "gptq", "awq", "hqq", "autoround", "aqlm", "vptq", "spqr", PACKAGE)


@dataclasses.dataclass(frozen=True)
class Row:
    """One table row: ``method`` (a qcompile algorithm, or :data:`PACKAGE`) quantizing every linear to ``scheme``
    (for the package: ``int<b>-g<g>``, its W<b>G<g>), in the ~``bits`` group."""

    bits: int
    method: str
    scheme: str
    options: tuple = ()  # extra recipe options, (name, value) pairs


ROWS: tuple[Row, ...] = (
    Row(2, "rtn", "int2-g64"),
    Row(2, "gptq", "int2-g64"),
    Row(2, "hqq", "int2-g64"),
    Row(2, "autoround", "int2-g64", (("preset", "light"),)),
    Row(2, "aqlm", "aqlm-2x8"),
    Row(2, "vptq", "vptq-v4-k256"),
    Row(2, PACKAGE, "int2-g64"),
    Row(3, "rtn", "int3-g128"),
    Row(3, "gptq", "int3-g128"),
    Row(3, "awq", "int3-g128"),
    Row(3, "hqq", "int3-g128"),
    Row(3, "autoround", "int3-g128", (("preset", "light"),)),
    Row(3, "aqlm", "aqlm-3x8"),
    Row(3, "vptq", "vptq-v4-k256-r16"),
    Row(4, "rtn", "int4-g128"),
    Row(4, "gptq", "int4-g128"),
    Row(4, "awq", "int4-g128"),
    Row(4, "autoround", "int4-g128", (("preset", "light"),)),
    Row(4, "spqr", "spqr-3"),
    Row(4, PACKAGE, "int4-g128"),
)


def select(bits: tuple[int, ...], methods: tuple[str, ...]) -> list[Row]:
    """The rows of ``ROWS`` in the ``bits`` groups, in that order, whose method is one of ``methods`` (errors name the
    unknown)."""
    unknown = [m for m in methods if m not in METHODS] + [str(b) for b in bits if b not in (2, 3, 4)]
    if unknown:
        raise SystemExit(f"accuracy_lowbit: unknown {unknown}; methods: {', '.join(METHODS)}; bits: 2, 3, 4")
    return [r for b in bits for r in ROWS if r.bits == b and r.method in methods]


def calibration_windows(ids: torch.Tensor, samples: int, seq_len: int) -> list[torch.Tensor]:
    """``samples`` non-overlapping windows ``[1, seq_len]`` (int64) from token ids ``[S]`` (fewer if it runs out)."""
    count = min(samples, ids.numel() // seq_len)
    if count == 0:
        raise ValueError(f"accuracy_lowbit: calibration text has {ids.numel()} tokens, fewer than seq_len {seq_len}")
    return [ids[i * seq_len : (i + 1) * seq_len].reshape(1, -1).long() for i in range(count)]


def packed_bits(model: torch.nn.Module) -> tuple[float, int]:
    """``(bits per weight, layers)`` over every :class:`QuantizedLinear` of ``model``: all its packed tensors' bytes
    x 8 / its ``in_features x out_features`` (``accuracy_formats.Ours``' count)."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if not layers:
        raise ValueError("accuracy_lowbit: the model has no QuantizedLinear to count bits of")
    stored = sum(t.numel() * t.element_size() for m in layers for t in m.packed())
    return 8 * stored / sum(m.in_features * m.out_features for m in layers), len(layers)


def autoround_options(row: Row, iters: int | None) -> dict:
    options = dict(row.options)
    if row.method in ("autoround", PACKAGE) and iters is not None:
        options["iters"] = iters
    return options


def label(row: Row, iters: int | None) -> str:
    if row.method in ("autoround", PACKAGE):
        return f"{row.method} ({'light, 50' if iters is None else iters} iters)"
    return row.method


def run_qcompile(row: Row, base, windows, options: dict) -> dict:
    model = copy.deepcopy(base)
    recipe = {"default": row.scheme, "algorithm": row.method, "options": options}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the o_proj fold under grouped-query attention (AWQ), reported in docs
        qcompile.quantize(model, recipe, calibration=windows, progress_bar=False)
    seconds = time.perf_counter() - start
    bits, layers = packed_bits(model)
    return {"model": fake_quant(model), "seconds": seconds, "bits": bits, "note": f"{layers} layers, fake-quant"}


def _datasets_stand_in() -> str:
    """Import ``datasets`` or put an empty stand-in in ``sys.modules`` (``auto_round`` imports it at load time and
    uses it only for hub data sets). Returns what the note says."""
    try:
        import datasets

        return "datasets stand-in; " if getattr(datasets, "qcompile_stand_in", False) else ""
    except ImportError:
        stand_in = types.ModuleType("datasets")

        def refused(*args, **kwargs):
            raise RuntimeError("datasets is not installed: hub data sets are not available")

        for name in ("Dataset", "Features", "IterableDataset", "Sequence", "Value"):
            setattr(stand_in, name, type(name, (), {}))
        for name in ("concatenate_datasets", "load_dataset", "load_from_disk"):
            setattr(stand_in, name, refused)
        stand_in.__version__, stand_in.qcompile_stand_in = "0", True
        sys.modules["datasets"] = stand_in
        return "datasets stand-in; "


def package_bits(model: torch.nn.Module, bits: int, group: int) -> float:
    """Bits per weight of the package's ``auto_round`` export for the linears of ``model`` but the lm_head: codes
    ``b`` bits, a float16 scale and a ``b``-bit zero per group, on K padded to the group."""
    stored = weights = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            groups = -(-m.in_features // group)
            stored += m.out_features * (groups * group * bits + groups * (16 + bits))
            weights += m.in_features * m.out_features
    return stored / weights


def run_package(row: Row, base, tokenizer, windows, options: dict) -> dict:
    note = _datasets_stand_in()
    from auto_round import AutoRound

    bits, group = (int(x) for x in row.scheme[3:].split("-g"))
    iters = int(options.get("iters", 50))  # qcompile's light preset
    model = copy.deepcopy(base)
    seq_len = windows[0].shape[1]
    start = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        ar = AutoRound(model, tokenizer, bits=bits, group_size=group, sym=False, dataset=list(windows),
                       iters=iters, nsamples=len(windows), seqlen=seq_len, batch_size=min(8, len(windows)),
                       lr=1.0 / max(iters, 1), device_map="cpu", amp=False, low_gpu_mem_usage=False,
                       enable_torch_compile=False)  # fmt: skip
        quantized, _ = ar.quantize()
    seconds = time.perf_counter() - start
    return {"model": quantized, "seconds": seconds, "bits": package_bits(quantized, bits, group),
            "note": note + f"W{bits}G{group} asym, fake-quant; bits of its auto_round export"}  # fmt: skip


def measure(row: Row, base, tokenizer, windows, eval_ids, iters: int | None = None, seq_len: int = 512) -> dict:
    """One row's result (``bits``, ``ppl``, ``seconds``, ``note``); a row that cannot run gives its error as the note
    (and NaN), not a failed run."""
    result = {"bits_group": row.bits, "method": label(row, iters), "scheme": row.scheme}
    options = autoround_options(row, iters)
    try:
        if row.method == PACKAGE:
            out = run_package(row, base, tokenizer, windows, options)
        else:
            out = run_qcompile(row, base, windows, options)
        ppl = perplexity(out["model"], eval_ids, seq_len=seq_len)
    except Exception as error:  # noqa: BLE001  (the table says why a row has no number)
        message = " ".join(str(error).split())[:300]
        return {**result, "bits": math.nan, "ppl": math.nan, "seconds": math.nan,
                "note": f"not run: {type(error).__name__}: {message}"}  # fmt: skip
    return {**result, "bits": out["bits"], "ppl": ppl, "seconds": out["seconds"], "note": out["note"]}


def float_row(base, eval_ids, seq_len: int = 512) -> dict:
    ppl = perplexity(base, eval_ids, seq_len)
    return {"bits_group": 16, "method": "float", "scheme": "-", "bits": 32.0, "ppl": ppl, "seconds": 0.0,
            "note": "float32"}  # fmt: skip


def markdown(results: dict) -> str:
    rows = results["rows"]
    float_ppl = next((r["ppl"] for r in rows if r["method"] == "float"), math.nan)
    lines = [f"Perplexity, SmolLM2-135M, {results['eval_tokens']} held-out tokens (float {float_ppl:.3f}); "
             f"calibration {results['samples']} x {results['seq_len']} tokens", "",
             "| ~bits | method | scheme | bits / weight | perplexity | x float | quantize time | note |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        group = "-" if r["method"] == "float" else f"~{r['bits_group']}"
        if math.isnan(r["ppl"]):
            cells = (group, r["method"], r["scheme"], "-", "-", "-", "-", r["note"])
        else:
            cells = (group, r["method"], r["scheme"], f"{r['bits']:.3f}", f"{r['ppl']:.3f}",
                     f"{r['ppl'] / float_ppl:.2f}", f"{r['seconds']:.1f} s", r["note"])  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", default="2,3,4", help="comma-separated groups of 2, 3, 4 (default all)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--quick", action="store_true", help="1,024 eval tokens, 4 x 128 calibration tokens")
    parser.add_argument("--samples", type=int, help="calibration windows (default 16, --quick 4)")
    parser.add_argument("--seq-len", type=int, help="tokens per calibration window (default 512, --quick 128)")
    parser.add_argument("--tokens", type=int, help="held-out tokens (default 4096, --quick 1024)")
    parser.add_argument("--autoround-iters", type=int, help="SignSGD steps of AutoRound and the package "
                        "(default: the light preset's 50)")  # fmt: skip
    parser.add_argument("--no-float", action="store_true", help="leave the float row out")
    parser.add_argument("--out", help="write the results as JSON here (after every row)")
    args = parser.parse_args(argv)
    rows = select(tuple(int(b) for b in args.bits.split(",")), tuple(args.methods.split(",")))
    samples, seq_len, tokens = (4, 128, 1024) if args.quick else (16, 512, 4096)
    samples, seq_len, tokens = args.samples or samples, args.seq_len or seq_len, args.tokens or tokens

    from qcompile.models import calibration_text, eval_text, load_smollm2

    torch.manual_seed(0)
    start = time.perf_counter()
    base, tokenizer = load_smollm2()
    print(f"loaded SmolLM2-135M in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    eval_ids = torch.tensor(tokenizer.encode(eval_text())[:tokens])
    windows = calibration_windows(torch.tensor(tokenizer.encode(calibration_text())), samples, seq_len)
    results = {"eval_tokens": int(eval_ids.numel()), "samples": len(windows), "seq_len": seq_len, "rows": []}
    todo = ([None] if not args.no_float else []) + rows
    for row in todo:
        if row is None:
            r = float_row(base, eval_ids)
        else:
            r = measure(row, base, tokenizer, windows, eval_ids, args.autoround_iters)
        results["rows"].append(r)
        print(f"~{r['bits_group']:<2} {r['method']:>28} {r['scheme']:>17} {r['bits']:7.3f} b  ppl {r['ppl']:10.3f}  "
              f"{r['seconds']:7.1f}s  {r['note']}", file=sys.stderr, flush=True)  # fmt: skip
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=2)
    print(markdown(results))


if __name__ == "__main__":
    main()
