"""Scheme families side by side: bits per weight, SmolLM2-135M perplexity and CPU time at decode size.

For each scheme (default: float, ``int4-g128`` RTN and every example of the ``fp8-block``, ``mxfp4`` and ``nvfp4``
families that is registered) one run prints a table with

- bits per weight at 4096×4096 (from the scheme's declared tensors, :meth:`Scheme.bits_per_weight`);
- perplexity of SmolLM2-135M-Instruct on held-out text (:func:`qcompile.models.eval_text`), every linear layer but
  the tied ``lm_head`` quantized with round to nearest and run through ``torch.ops.qcompile.linear`` (real kernels,
  activations quantized at run time where the scheme does so);
- ``torch.ops.qcompile.linear`` at M=1, K=N=4096, float32 and bfloat16 activations, against ``F.linear`` in the
  same dtype (median of repeats, in this process, on this CPU), and the kernel row that served the call.

Usage::

    python benchmarks/formats.py [--schemes fp8-block mxfp4 ...] [--tokens 2048] [--no-ppl] [--no-time]
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
import torch.nn.functional as F

import qcompile
from qcompile.codegen.cpp import library
from qcompile.runtime import dispatch
from qcompile.schemes import families, parse_scheme
from timing import median_ms

NEW_FAMILIES = ("fp8-block", "mxfp4", "nvfp4")


def default_schemes() -> list[str]:
    names = ["int4-g128"]
    for record in families():
        if record.name in NEW_FAMILIES:
            names += list(record.examples)
    return names


def cpu_times(name: str, repeats: int) -> dict[str, object]:
    k = n = 4096
    scheme = parse_scheme(name)
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
    packed = scheme.pack(scheme.quantize(weight)).list()
    out: dict[str, object] = {}
    for label, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        x = torch.randn(1, k, generator=torch.Generator().manual_seed(1)).to(dtype)
        dense = weight.to(dtype)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            ours = median_ms(lambda: torch.ops.qcompile.linear(x, packed, None, name, k, n), repeats)
        kernel, _ = dispatch.select_kernel(scheme, x, packed)
        out[f"ours {label}"] = ours
        out[f"F.linear {label}"] = median_ms(lambda: F.linear(x, dense), repeats)
        out[f"row {label}"] = kernel.name if kernel is not None else "reference"
    return out


def smollm2_perplexity(names: list[str], tokens: int) -> dict[str, float]:
    from qcompile.evaluate import perplexity
    from qcompile.models import eval_text, load_smollm2

    model, tokenizer = load_smollm2()
    ids = tokenizer(eval_text(), return_tensors="pt").input_ids[0][:tokens]
    out = {"float32": perplexity(model, ids)}
    print(f"  float32: {out['float32']:.2f}", flush=True)
    for name in names:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantized = qcompile.quantize(copy.deepcopy(model), name, progress_bar=False)
            out[name] = perplexity(quantized, ids)
        print(f"  {name}: {out[name]:.2f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", nargs="+", default=None)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-ppl", dest="ppl", action="store_false")
    parser.add_argument("--no-time", dest="time", action="store_false")
    args = parser.parse_args(argv)
    names = args.schemes or default_schemes()
    torch.manual_seed(0)
    print(f"# schemes: {', '.join(names)}; CPU isa {library.active_isa()}, {torch.get_num_threads()} threads")
    ppl = {}
    if args.ppl:
        print(f"SmolLM2-135M perplexity on {args.tokens} held-out tokens ...", flush=True)
        ppl = smollm2_perplexity(names, args.tokens)
    header = ["scheme", "bits/weight", "SmolLM2 ppl", "ours f32 ms", "F.linear f32 ms", "F.linear/ours f32", "ours bf16 ms",
              "F.linear bf16 ms", "F.linear/ours bf16", "row (f32 / bf16)"]  # fmt: skip
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    if "float32" in ppl:
        print(f"| float32 | 32 | {ppl['float32']:.2f} |" + " – |" * 7)
    for name in names:
        scheme = parse_scheme(name)
        row = [name, f"{scheme.bits_per_weight(4096, 4096):.3f}", f"{ppl[name]:.2f}" if name in ppl else "–"]
        if args.time:
            t = cpu_times(name, args.repeats)
            for label in ("f32", "bf16"):
                ours, dense = t[f"ours {label}"], t[f"F.linear {label}"]
                row += [f"{ours:.3f}", f"{dense:.3f}", f"{dense / ours:.2f}"]
            row.append(f"{t['row f32']} / {t['row bf16']}")
        else:
            row += ["–"] * 7
        print("| " + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
