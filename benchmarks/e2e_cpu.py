"""SmolLM2-135M on CPU: model bytes, perplexity, decode tokens/s and compile time per scheme.

    python benchmarks/e2e_cpu.py [--schemes int8,int4-g128,...] [--tokens 1024] [--new-tokens 32] [--inductor]

Rows: float eager, float ``torch.compile`` (inductor, with ``--inductor``), and qcompile per scheme.
Perplexity runs the ``qcompile.compile`` program (torch.export path) on held-out text. Decode speed (KV cache,
greedy, batch 1) is taken twice per scheme: on the eagerly quantized model (``qcompile.quantize``: the
transformers code runs op by op in Python), and with ``--inductor`` through
``torch.compile(forward, backend="qcompile", options={"inductor": True})``, where inductor fuses everything
between the quantized matmuls (a few minutes of compilation per row on a small CPU). Kernels are whatever the
dispatch table serves on this machine (C++ where a kernel exists, the reference path elsewhere — said once).
``+head:int8`` also quantizes the tied ``lm_head`` (its float copy stays for the embedding lookup).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import qcompile
from qcompile.evaluate import decode_tokens_per_second, model_bytes, perplexity
from qcompile.models import eval_text, load_smollm2
from qcompile.report import format_table, human_bytes

SCHEMES = ("int8", "int4-g128", "int4-g32", "w8a8", "w4a8-g128", "fp8", "int4-g128+head:int8", "w4a8-g128+head:int8")


def recipe_for(spec: str) -> dict:
    """``int4-g128`` → that scheme everywhere (the tied lm_head stays float, as by default);
    ``int4-g128+head:int8`` → also quantize lm_head (its float copy stays for the embedding lookup)."""
    scheme, _, head = spec.partition("+head:")
    recipe = {"default": scheme}
    if head:
        recipe["overrides"] = [{"targets": ["lm_head"], "scheme": head}]
    return recipe


def compiled_decode(model, prompt, new_tokens: int, **compile_kwargs) -> tuple[float, float]:
    """(tokens/s, seconds to first result) with ``model.forward`` compiled; one graph across cache lengths."""
    torch._dynamo.reset()  # every row compiles afresh: forward's code object is shared by all the model copies
    start = time.perf_counter()
    model.forward = torch.compile(model.forward, dynamic=True, **compile_kwargs)
    tps = decode_tokens_per_second(model, prompt, new_tokens)
    return tps, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--inductor", action="store_true",
                        help="also decode through torch.compile + inductor (minutes per row)")  # fmt: skip
    args = parser.parse_args(argv)

    model, tokenizer = load_smollm2()
    ids = tokenizer(eval_text(), return_tensors="pt").input_ids[0][: args.tokens]
    prompt = tokenizer("The three witches met Macbeth on the heath and", return_tensors="pt").input_ids
    example = {"input_ids": ids[:16].unsqueeze(0).repeat(2, 1)}

    rows = []
    float_tps = decode_tokens_per_second(model, prompt, args.new_tokens)
    rows.append(["float32", human_bytes(model_bytes(model)), f"{perplexity(model, ids):.2f}", f"{float_tps:.1f}",
                 "1.00x", "-", "-", "-"])  # fmt: skip
    print(rows[-1], flush=True)
    if args.inductor:
        tps, seconds = compiled_decode(copy.deepcopy(model), prompt, args.new_tokens)
        rows[-1][5:] = [f"{tps:.1f}", f"{tps / float_tps:.2f}x", f"{seconds:.0f} s"]
        print(rows[-1], flush=True)
    for scheme in args.schemes.split(","):
        start = time.perf_counter()
        program = qcompile.compile(model, (), recipe_for(scheme), example_kwargs=example, progress_bar=False)
        compile_s = time.perf_counter() - start
        ppl = perplexity(program, ids)
        nbytes = model_bytes(program)
        del program
        eager = qcompile.quantize(copy.deepcopy(model), recipe_for(scheme), progress_bar=False)
        tps = decode_tokens_per_second(eager, prompt, args.new_tokens)
        del eager
        row = [scheme, human_bytes(nbytes), f"{ppl:.2f}", f"{tps:.1f}", f"{tps / float_tps:.2f}x", "-", "-",
               f"{compile_s:.1f} s"]  # fmt: skip
        if args.inductor:
            options = {"recipe": recipe_for(scheme), "inductor": True}
            tps, seconds = compiled_decode(copy.deepcopy(model), prompt, args.new_tokens, backend="qcompile",
                                           options=options)  # fmt: skip
            row[5:] = [f"{tps:.1f}", f"{tps / float_tps:.2f}x", f"{compile_s:.1f} s / {seconds:.0f} s"]
        rows.append(row)
        print(rows[-1], flush=True)
    print()
    print(f"SmolLM2-135M, {ids.numel()} held-out tokens, {torch.get_num_threads()} threads, "
          f"decode of {args.new_tokens} tokens")  # fmt: skip
    headers = ["model", "bytes", "perplexity", "eager tok/s", "vs float eager", "inductor tok/s", "vs float eager",
               "compile (export / inductor)"]  # fmt: skip
    print(format_table(headers, rows, "lrrrrrrr"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
