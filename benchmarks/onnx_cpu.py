"""ONNX export on CPU: for each scheme, all-MiniLM-L6-v2 (real weights) quantized, exported, and timed.

Per scheme (every linear layer of the encoder and pooler gets it), one row: the ONNX file size, the largest
difference between onnxruntime and qcompile on the validation inputs (absolute and relative to the largest
output value), and the median latency of onnxruntime and of qcompile's own CPU path (``qcompile::linear`` with
whatever CPU kernels are registered, else the reference) on one batch. A float row exports the unquantized
model with ``torch.onnx`` for scale. Both runtimes get the same number of threads.

Usage::

    python benchmarks/onnx_cpu.py [--schemes int8,int4-g32] [--batch 4] [--seq 64] [--threads 2] [--out rows.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings

import torch

import qcompile
import qcompile.onnx
from qcompile.models import load_minilm
from qcompile.onnx.validate import feeds, session
from timing import median_ms

SCHEMES = ("int8", "int4-g32", "int4-g32-sym", "int4-g128", "int4-g128@qdq", "int2-g32", "w8a8", "fp8", "nf4-g64")


def _inputs(tokenizer, batch: int, seq: int) -> dict:
    words = ("quantized encoders keep their accuracy while the weights shrink " * 64).split()
    texts = [" ".join(words[i : i + seq]) for i in range(batch)]
    return dict(tokenizer(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt"))


def run_scheme(model, examples, timed, label: str, directory: str, threads: int, repeats: int) -> dict:
    scheme, _, int4_format = label.partition("@")
    program = qcompile.compile(model, (), scheme, example_kwargs=examples, progress_bar=False)
    path = os.path.join(directory, label.replace("@", "-") + ".onnx")
    # atol=inf: report the difference whatever it is (w8a8 on MiniLM amplifies ulp-level float differences)
    report = qcompile.onnx.export(program, path=path, int4_format=int4_format or "matmulnbits", atol=float("inf"))
    worst = max(report.comparisons, key=lambda c: c.relative)
    sess = session(path, threads=threads)
    onnx_feeds = feeds(sess, (), timed)
    with torch.no_grad():
        qcompile_ms = median_ms(lambda: program(**timed), repeats)
    onnx_ms = median_ms(lambda: sess.run(None, onnx_feeds), repeats)
    return {
        "scheme": label, "file_mib": round(report.file_bytes / 2**20, 2),
        "quantized_mib": round(report.quantized_bytes / 2**20, 2),
        "max_abs_diff": worst.max_abs_diff, "max_rel_diff": worst.relative,
        "onnxruntime_ms": round(onnx_ms, 2), "qcompile_ms": round(qcompile_ms, 2),
        "onnx_forms": sorted({s.lowering.onnx_op for s in report.sites}),
    }  # fmt: skip


def run_float(model, examples, timed, directory: str, threads: int, repeats: int) -> dict:
    path = os.path.join(directory, "float.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        shapes = {k: {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO} for k in examples}
        torch.onnx.export(model, (), path, kwargs=examples, dynamic_shapes=shapes, dynamo=True, external_data=False)
    sess = session(path, threads=threads)
    onnx_feeds = feeds(sess, (), timed)
    with torch.no_grad():
        torch_ms = median_ms(lambda: model(**timed), repeats)
    onnx_ms = median_ms(lambda: sess.run(None, onnx_feeds), repeats)
    return {"scheme": "float", "file_mib": round(os.path.getsize(path) / 2**20, 2), "quantized_mib": 0.0,
            "max_abs_diff": None, "max_rel_diff": None, "onnxruntime_ms": round(onnx_ms, 2),
            "qcompile_ms": round(torch_ms, 2), "onnx_forms": ["MatMul"]}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated; 'name@qdq' for int4 as QDQ")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-float", action="store_true")
    parser.add_argument("--out", help="write the rows as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_minilm()
    examples = _inputs(tokenizer, 2, 16)
    timed = _inputs(tokenizer, args.batch, args.seq)
    rows = []
    header = f"{'scheme':<15} {'file MiB':>9} {'max|diff|':>10} {'rel':>8} {'ORT ms':>8} {'qcompile ms':>12}  ONNX"
    print(f"all-MiniLM-L6-v2, batch {args.batch} x seq {args.seq}, {args.threads} threads")
    print(header)
    with tempfile.TemporaryDirectory() as directory:
        labels = ([] if args.no_float else ["float"]) + [s for s in args.schemes.split(",") if s]
        for label in labels:
            if label == "float":
                row = run_float(model, examples, timed, directory, args.threads, args.repeats)
            else:
                row = run_scheme(model, examples, timed, label, directory, args.threads, args.repeats)
            rows.append(row)
            diff = "-" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.2e}"
            rel = "-" if row["max_rel_diff"] is None else f"{row['max_rel_diff']:.1e}"
            print(f"{row['scheme']:<15} {row['file_mib']:>9.2f} {diff:>10} {rel:>8} {row['onnxruntime_ms']:>8.2f} "
                  f"{row['qcompile_ms']:>12.2f}  {', '.join(row['onnx_forms'])}", flush=True)  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
