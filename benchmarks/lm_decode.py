"""Decode speed of a language-model ``.qpt`` (the KV-cache step program) against the eager models, SmolLM2-135M.

Rows: float32 eager ``generate`` with its KV cache; ``qcompile.quantize`` (eager, quantized, KV cache); the same
recipe exported with ``qcompile.export`` and loaded back (``program.generate``). Greedy, batch 1, the end-of-sequence
token off so every row decodes the same number of tokens; the loaded program's tokens are checked against the eager
quantized model's.

    python benchmarks/lm_decode.py [--recipe int4-g128] [--tokens 64]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from pathlib import Path

import torch

import qcompile
from qcompile.models import load_smollm2


def _rate(run, tokens: int) -> tuple[torch.Tensor, float]:
    run(4)  # warm up
    start = time.perf_counter()
    out = run(tokens)
    return out, tokens / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="int4-g128")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    model, tokenizer = load_smollm2()
    model.generation_config.eos_token_id = None
    ids = tokenizer("The history of the Python programming language", return_tensors="pt")["input_ids"]
    eager = qcompile.quantize(copy.deepcopy(model), args.recipe, progress_bar=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.qpt"
        qcompile.export(copy.deepcopy(model), (), args.recipe, path, example_kwargs={"input_ids": ids},
                        progress_bar=False)  # fmt: skip
        loaded = qcompile.load(path)

    def hf(m):
        return lambda n: m.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)

    with torch.no_grad():
        rows = [("float32 eager, KV cache", *_rate(hf(model), args.tokens)),
                (f"{args.recipe} eager (qcompile.quantize), KV cache", *_rate(hf(eager), args.tokens)),
                (f"{args.recipe} loaded .qpt (step program), KV cache",
                 *_rate(lambda n: loaded.generate(ids, max_new_tokens=n, eos_token_id=-1), args.tokens))]  # fmt: skip
    same = torch.equal(rows[1][1], rows[2][1])
    print(f"SmolLM2-135M greedy decode, batch 1, {args.tokens} tokens, {torch.get_num_threads()} threads")
    print("| model | tokens/s | x float |\n|---|---|---|")
    for name, _, rate in rows:
        print(f"| {name} | {rate:.1f} | {rate / rows[0][2]:.2f} |")
    print(f"loaded .qpt tokens equal the eager quantized model's: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
