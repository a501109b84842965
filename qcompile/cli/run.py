"""``qcompile generate`` and ``eval``: run a ``.qpt`` file on a prompt or on a text."""

from __future__ import annotations

import math
import os
import sys
import time

from qcompile.cli.common import FAILED, OK, UsageError, causal_program, say, tokenizer_for


def cmd_generate(args) -> tuple[int, dict]:
    import torch

    program = causal_program(args)
    tokenizer = tokenizer_for(program, args.tokenizer)
    if tokenizer is None:
        raise UsageError("no tokenizer: pass --tokenizer DIR (a Hugging Face directory) or a built-in model name")
    ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    if getattr(program, "language_model", None) is not None:
        return _generate_with_cache(args, program, tokenizer, ids)
    start = time.perf_counter()
    from tqdm.auto import tqdm

    with torch.no_grad():
        for _ in tqdm(range(args.max_new_tokens), desc="generate", unit="token", leave=False, file=sys.stderr,
                      disable=True if args.json else None):  # fmt: skip
            logits = program(input_ids=ids).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
            if tokenizer.eos_token_id is not None and int(token) == tokenizer.eos_token_id:
                break
    seconds = time.perf_counter() - start
    prompt_len = tokenizer(args.prompt, return_tensors="pt")["input_ids"].shape[1]
    new = ids.shape[1] - prompt_len
    text = tokenizer.decode(ids[0], skip_special_tokens=True)
    result = {"text": text, "new_tokens": new, "tokens_per_second": round(new / seconds, 2) if seconds else None}
    if not args.json:
        print(text)
        print(f"[{new} tokens, {result['tokens_per_second']} tokens/s, greedy, no KV cache]", file=sys.stderr)
    return OK, result


def _generate_with_cache(args, program, tokenizer, ids) -> tuple[int, dict]:
    """A language-model program: its KV-cache step, greedy or sampled."""
    import torch

    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    try:
        start = time.perf_counter()
        out = program.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                               eos_token_id=tokenizer.eos_token_id, generator=generator)  # fmt: skip
        seconds = time.perf_counter() - start
    except ValueError as error:
        raise UsageError(str(error)) from None
    new = out.shape[1] - ids.shape[1]
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    result = {"text": text, "new_tokens": new, "tokens_per_second": round(new / seconds, 2) if seconds else None}
    if not args.json:
        mode = "sampled" if args.do_sample else "greedy"
        print(text)
        print(f"[{new} tokens, {result['tokens_per_second']} tokens/s, {mode}, KV cache]", file=sys.stderr)
    return OK, result


def cmd_eval(args) -> tuple[int, dict]:
    from qcompile.evaluate import perplexity
    from qcompile.models import eval_text

    program = causal_program(args)
    tokenizer = tokenizer_for(program, args.tokenizer)
    if tokenizer is None:
        raise UsageError("no tokenizer: pass --tokenizer DIR (a Hugging Face directory) or a built-in model name")
    if args.text and not os.path.isfile(args.text):
        raise UsageError(f"text file {args.text!r} does not exist")
    text = open(args.text, encoding="utf-8").read() if args.text else eval_text()
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0][: args.max_tokens]
    start = time.perf_counter()
    value = perplexity(program, ids, seq_len=args.seq_len)
    result = {"perplexity": value, "tokens": int(ids.numel()), "seconds": round(time.perf_counter() - start, 2)}
    if args.max_perplexity is None:  # no threshold, no verdict: the number is the result
        say(args, result)
        return OK, result
    failed = not math.isfinite(value) or value > args.max_perplexity
    result["passed"] = not failed
    say(args, result)
    return (FAILED if failed else OK), result
