"""``make demo``: SmolLM2-135M (real weights) quantized with the default recipe, compiled, saved as a
``.qpt``, reloaded, and compared with the float model on size, perplexity and decode speed."""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import torch

import qcompile
from qcompile.evaluate import decode_tokens_per_second, model_bytes, perplexity
from qcompile.export import export, load
from qcompile.models import eval_text, load_smollm2
from qcompile.report import format_table, human_bytes

DEFAULT_RECIPE = {"default": "int4-g128"}
PROMPT = "The three witches met Macbeth on the heath and"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", default=None, help="recipe file or scheme name (default: int4-g128)")
    parser.add_argument("--tokens", type=int, default=2048, help="held-out tokens for perplexity")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated for the speed measurement")
    parser.add_argument("--output", default=None, help="where to write the .qpt (default: a temporary folder)")
    args = parser.parse_args(argv)
    recipe = qcompile.load_recipe(args.recipe or DEFAULT_RECIPE)
    torch.manual_seed(0)

    print("loading SmolLM2-135M-Instruct (first run converts the GGUF and caches it) ...", flush=True)
    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    print(f"  loaded in {time.perf_counter() - start:.1f} s")
    ids = tokenizer(eval_text(), return_tensors="pt").input_ids[0][: args.tokens]
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids

    print("float model: perplexity and decode speed ...", flush=True)
    float_ppl = perplexity(model, ids)
    float_tps = decode_tokens_per_second(model, prompt, args.new_tokens)
    float_bytes = model_bytes(model)

    print(f"quantize + compile with recipe {qcompile.recipe.recipe_json(recipe)} ...", flush=True)
    workdir = tempfile.mkdtemp(prefix="qcompile-demo-")
    path = args.output or os.path.join(workdir, "smollm2.qpt")
    example = {"input_ids": ids[:16].unsqueeze(0).repeat(2, 1)}
    start = time.perf_counter()
    export(model, (), recipe, path, example_kwargs=example)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    program = load(path)
    load_s = time.perf_counter() - start
    plan = program.plan
    print(plan.table().splitlines()[-1].replace("total", f"plan: {len(plan)} sites,", 1))
    size = human_bytes(os.path.getsize(path))
    print(f"  compiled + saved in {compile_s:.1f} s; reloaded {path} ({size}) in {load_s:.2f} s")

    print("quantized model (reloaded .qpt): perplexity ...", flush=True)
    quant_ppl = perplexity(program, ids)
    quant_bytes = model_bytes(program)

    print("quantized model (eager, KV cache): generation and decode speed ...", flush=True)
    eager = qcompile.quantize(copy.deepcopy(model), recipe, progress_bar=False)
    quant_tps = decode_tokens_per_second(eager, prompt, args.new_tokens)
    with torch.no_grad():
        out = eager.generate(prompt, max_new_tokens=24, do_sample=False, use_cache=True)
    print(f"  continuation: {tokenizer.decode(out[0], skip_special_tokens=True)!r}")

    rows = [
        ["float32", human_bytes(float_bytes), f"{float_ppl:.2f}", f"{float_tps:.1f}", "", ""],
        [
            recipe.default or "custom",
            human_bytes(quant_bytes),
            f"{quant_ppl:.2f}",
            f"{quant_tps:.1f}",
            f"{float_bytes / quant_bytes:.2f}x smaller",
            f"{quant_tps / float_tps:.2f}x speed",
        ],
    ]
    print()
    print(f"SmolLM2-135M on {ids.numel()} held-out tokens (Macbeth), {torch.get_num_threads()} threads")
    print(format_table(["model", "bytes", "perplexity", "tokens/s", "size", "decode"], rows, "lrrrrr"))
    print(f"\n.qpt: {path}  ({human_bytes(os.path.getsize(path))}, loads in {load_s:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
