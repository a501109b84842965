"""The ``qcompile`` command line: quantize a model to a ``.qpt`` file, inspect, verify, generate, evaluate.

    qcompile quantize smollm2 --recipe int4-g128 -o smollm2.qpt
    qcompile inspect smollm2.qpt
    qcompile verify smollm2.qpt
    qcompile generate smollm2.qpt --prompt "The king said" --max-new-tokens 20
    qcompile eval smollm2.qpt --text qcompile/data/macbeth.txt

Exit codes: 0 ok, 1 verification or evaluation failed, 2 usage error (bad arguments, missing file, bad
recipe), 3 the ``.qpt`` file is corrupt or unsafe. ``--json`` prints one JSON object for scripts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

OK, FAILED, USAGE, CORRUPT = 0, 1, 2, 3
BUILTIN_MODELS = ("smollm2", "minilm", "tiny-llama")


class UsageError(Exception):
    """Bad arguments or inputs the user can fix; exit code 2."""


# -- models -----------------------------------------------------------------------------------------
def _load_model(source: str):
    """``(model, tokenizer or None, task)`` from a built-in name, a local Hugging Face directory or a .gguf file."""
    from qcompile import models

    if source == "smollm2":
        model, tokenizer = models.load_smollm2()
        return model, tokenizer, "causal-lm"
    if source == "minilm":
        model, tokenizer = models.load_minilm()
        return model, tokenizer, "encoder"
    if source == "tiny-llama":
        return models.tiny_llama(), None, "causal-lm"
    import transformers

    if os.path.isfile(source) and source.endswith(".gguf"):
        from qcompile import gguf

        try:  # linears keep the file's quantized blocks
            model, tokenizer = gguf.load(source, keep_codes=True)
            return model, tokenizer, "causal-lm"
        except gguf.GGUFError as error:
            print(f"qcompile: {error}; loading {source} dequantized through transformers instead", file=sys.stderr)
        directory, name = os.path.split(os.path.abspath(source))
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
        model.config.use_cache = False
        return model, tokenizer, "causal-lm"
    if os.path.isdir(source):
        config = transformers.AutoConfig.from_pretrained(source)
        causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
        auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        model = auto.from_pretrained(source).eval()
        if causal:
            model.config.use_cache = False
        return model, _tokenizer_at(source), "causal-lm" if causal else "encoder"
    names = ", ".join(BUILTIN_MODELS)
    raise UsageError(f"model {source!r} is not a built-in name ({names}), a directory or a .gguf file")


def _tokenizer_at(source: str):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        return None


def _example_inputs(model, tokenizer, task: str) -> dict:
    import torch

    texts = ["The quick brown fox jumps over the lazy dog.", "Quantized models load from one file."]
    if tokenizer is not None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        inputs = {"input_ids": batch["input_ids"]}
        if task == "encoder":
            inputs["attention_mask"] = batch["attention_mask"]
        return inputs
    vocab = getattr(model.config, "vocab_size", 128)
    inputs = {"input_ids": torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))}
    if task == "encoder":
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return inputs


def _tokenizer_for(program, explicit: str | None):
    """The tokenizer named by ``--tokenizer``, else the one of the model source recorded at export."""
    source = explicit or program.manifest.get("metadata", {}).get("source")
    if source == "smollm2":
        import transformers

        from qcompile import models

        converted = models.cache_dir() / "models" / "smollm2"
        if converted.exists():
            return transformers.AutoTokenizer.from_pretrained(converted)
        gguf = models.smollm2_gguf_path()
        return transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if source == "minilm":
        from qcompile import models

        return _tokenizer_at(str(models.minilm_path()))
    if isinstance(source, str) and os.path.isdir(source):
        return _tokenizer_at(source)
    return None


# -- commands ---------------------------------------------------------------------------------------
def cmd_quantize(args) -> tuple[int, dict]:
    from qcompile.export import export
    from qcompile.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    model, tokenizer, task = _load_model(args.model)
    if getattr(args, "format", "qpt") == "gguf":
        return _quantize_gguf(args, recipe, model, tokenizer)
    inputs = _example_inputs(model, tokenizer, task)
    start = time.perf_counter()
    program = export(model, (), recipe, args.output, example_kwargs=inputs, progress_bar=not args.json,
                     metadata={"source": args.model, "task": task})  # fmt: skip
    plan = program.plan
    result = {"output": args.output, "bytes": os.path.getsize(args.output),
              "seconds": round(time.perf_counter() - start, 2), "sites": len(plan), "quantized": len(plan.quantized()),
              "weights_before": plan.bytes_before, "weights_after": plan.bytes_after}  # fmt: skip
    if not args.json:
        print(plan.table())
        print(f"wrote {args.output} ({_mib(result['bytes'])}) in {result['seconds']} s")
    return OK, result


def _quantize_gguf(args, recipe, model, tokenizer) -> tuple[int, dict]:
    """``--format gguf``: quantize eagerly with the recipe (``gguf`` schemes), write a GGUF file llama.cpp loads."""
    import qcompile
    from qcompile import gguf

    start = time.perf_counter()
    qcompile.quantize(model, recipe, progress_bar=not args.json)
    try:
        gguf.save(model, args.output, tokenizer)
    except ValueError as error:
        raise UsageError(str(error)) from None
    plan = model.qcompile_plan
    result = {"output": args.output, "bytes": os.path.getsize(args.output), "format": "gguf",
              "seconds": round(time.perf_counter() - start, 2), "sites": len(plan),
              "quantized": len(plan.quantized())}  # fmt: skip
    if not args.json:
        print(plan.table())
        print(f"wrote {args.output} ({_mib(result['bytes'])}) in {result['seconds']} s")
    return OK, result


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB"


def cmd_inspect(args) -> tuple[int, dict]:
    from qcompile.report import format_table, human_bytes
    from qcompile.runtime.qpt_reader import read_artifact

    artifact = read_artifact(args.file, verify=False)
    manifest = artifact.manifest
    rows, layers = [], []
    from qcompile.runtime.qpt_manifest import plan_from_json

    plan = plan_from_json(manifest.get("plan"), manifest.get("recipe"))
    for entry in plan:
        site = entry.site
        layers.append({"name": site.name, "scheme": entry.scheme, "shape": [site.out_features, site.in_features],
                       "bytes_before": site.weight_bytes, "bytes_after": entry.bytes_after})  # fmt: skip
        rows.append([site.name, entry.scheme or f"keep ({site.weight_dtype})",
                     f"{site.out_features}x{site.in_features}", human_bytes(site.weight_bytes),
                     human_bytes(entry.bytes_after)])  # fmt: skip
    before, after = plan.bytes_before, plan.bytes_after
    quantized = f"{len(plan.quantized())}/{len(plan)} quantized"
    rows.append(["total", quantized, "", human_bytes(before), human_bytes(after)])
    fmt = manifest["format"]
    result = {"file": args.file, "bytes": artifact.size, "format": f"{fmt['major']}.{fmt['minor']}",
              "writer": manifest.get("writer", {}), "metadata": manifest.get("metadata", {}),
              "members": [{k: r[k] for k in ("name", "kind", "offset", "size")} for r in manifest["members"]],
              "inputs": manifest.get("inputs"), "layers": layers, "bytes_before": before,
              "bytes_after": after}  # fmt: skip
    if not args.json:
        writer = manifest.get("writer", {})
        print(f"{args.file}: .qpt {result['format']}, {human_bytes(artifact.size)}, written by qcompile "
              f"{writer.get('qcompile')} (torch {writer.get('torch')})")  # fmt: skip
        print(format_table(["site", "scheme", "N x K", "before", "after"], rows, "lllrr"))
    return OK, result


def cmd_verify(args) -> tuple[int, dict]:
    import torch
    import torch.utils._pytree as pytree

    from qcompile.export import load
    from qcompile.runtime.qpt_format import ArtifactError

    start = time.perf_counter()
    program = load(args.file, device=args.device)
    result = {"file": args.file, "checksums": "ok", "load_seconds": round(time.perf_counter() - start, 3)}
    examples = program.examples
    spec = program.module.graph._codegen.pytree_info.in_spec
    try:
        inputs = [examples[f"input.{i}"] for i in range(sum(k.startswith("input.") for k in examples))]
        expected = [examples[f"output.{i}"] for i in range(sum(k.startswith("output.") for k in examples))]
    except KeyError as error:
        raise ArtifactError(f"{args.file}: examples member: entry {error} is missing (names run 0, 1, …)") from None
    if not inputs:
        result["sample_run"] = "skipped (the file stores no example)"
        return OK, _say(args, result)
    if len(inputs) != spec.num_leaves:
        raise ArtifactError(
            f"{args.file}: examples member holds {len(inputs)} inputs, the graph takes {spec.num_leaves}"
        )
    call_args, call_kwargs = pytree.tree_unflatten([t.to(args.device) for t in inputs], spec)
    with torch.no_grad():
        got = [t.float().cpu() for t in pytree.tree_leaves(program(*call_args, **call_kwargs))]
    worst = 0.0
    for g, e in zip(got, expected):
        if g.shape != e.shape:
            worst = math.inf
            break
        scale = float(e.float().abs().max()) or 1.0
        worst = max(worst, float((g - e.float()).abs().max()) / scale)
    passed = len(got) == len(expected) and worst <= args.tolerance
    result.update({"sample_run": "ok" if passed else "mismatch", "max_relative_error": worst})
    return (OK if passed else FAILED), _say(args, result)


def _say(args, result: dict) -> dict:
    if not args.json:
        for key, value in result.items():
            print(f"{key}: {value}")
    return result


def _causal_program(args):
    from qcompile.export import load

    program = load(args.file)
    if program.manifest.get("metadata", {}).get("task", "causal-lm") != "causal-lm":
        raise UsageError(f"{args.file} holds an encoder; {args.command} needs a causal language model")
    return program


def cmd_generate(args) -> tuple[int, dict]:
    import torch

    program = _causal_program(args)
    tokenizer = _tokenizer_for(program, args.tokenizer)
    if tokenizer is None:
        raise UsageError("no tokenizer: pass --tokenizer DIR (a Hugging Face directory) or a built-in model name")
    ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
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


def cmd_eval(args) -> tuple[int, dict]:
    from qcompile.evaluate import perplexity
    from qcompile.models import eval_text

    program = _causal_program(args)
    tokenizer = _tokenizer_for(program, args.tokenizer)
    if tokenizer is None:
        raise UsageError("no tokenizer: pass --tokenizer DIR (a Hugging Face directory) or a built-in model name")
    if args.text and not os.path.isfile(args.text):
        raise UsageError(f"text file {args.text!r} does not exist")
    text = open(args.text, encoding="utf-8").read() if args.text else eval_text()
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0][: args.max_tokens]
    start = time.perf_counter()
    value = perplexity(program, ids, seq_len=args.seq_len)
    result = {"perplexity": value, "tokens": int(ids.numel()), "seconds": round(time.perf_counter() - start, 2)}
    failed = not math.isfinite(value) or (args.max_perplexity is not None and value > args.max_perplexity)
    result["passed"] = not failed
    _say(args, result)
    return (FAILED if failed else OK), result


# -- entry point --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcompile", description="Quantize models to .qpt files and run them.")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("quantize", help="quantize a model and write a .qpt file")
    names = ", ".join(BUILTIN_MODELS)
    p.add_argument("model", help=f"a built-in name ({names}), a Hugging Face directory or a .gguf file")
    p.add_argument("--recipe", default="int4-g128", help="a recipe file (YAML/JSON) or a scheme name (int4-g128)")
    p.add_argument("-o", "--output", required=True, help="the .qpt (or .gguf) file to write")
    p.add_argument("--format", choices=("qpt", "gguf"), default="qpt",
                   help="qpt (default) or gguf: a llama.cpp file; the recipe then uses gguf schemes (q4_0 … q6_k)")
    p = sub.add_parser("inspect", help="per-layer table of a .qpt file")
    p.add_argument("file")
    p = sub.add_parser("verify", help="check every checksum and replay the stored example")
    p.add_argument("file")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tolerance", type=float, default=1e-2, help="max error relative to the output's max (1e-2)")
    for name, helptext in (("generate", "greedy text generation"), ("eval", "perplexity on a text file")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("file")
        p.add_argument("--tokenizer", help="a Hugging Face directory or built-in name (default: the model's source)")
        if name == "generate":
            p.add_argument("--prompt", required=True)
            p.add_argument("--max-new-tokens", type=int, default=32)
        else:
            p.add_argument("--text", help="a UTF-8 text file (default: the bundled Macbeth excerpt)")
            p.add_argument("--max-tokens", type=int, default=2048)
            p.add_argument("--seq-len", type=int, default=512)
            p.add_argument("--max-perplexity", type=float, help="exit 1 when perplexity is above this")
    try:
        from qcompile.onnx.cli import add_subparser
    except ImportError:  # the onnx extra is not installed
        pass
    else:
        add_subparser(sub)
    for p in sub.choices.values():
        if "--json" not in p._option_string_actions:
            p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON object")
    return parser


COMMANDS = {"quantize": cmd_quantize, "inspect": cmd_inspect, "verify": cmd_verify, "generate": cmd_generate,
            "eval": cmd_eval}  # fmt: skip


def _export_onnx(args) -> tuple[int, dict]:
    from qcompile.onnx.cli import command

    return command(args)


def main(argv: list[str] | None = None) -> int:
    from qcompile.recipe import RecipeError
    from qcompile.runtime.qpt_format import ArtifactError

    args = build_parser().parse_args(argv)  # exits 2 on bad usage
    try:
        file = getattr(args, "file", None)
        if file is not None and not os.path.isfile(file):
            raise UsageError(f"{file!r} does not exist or is not a file")
        code, result = COMMANDS.get(args.command, _export_onnx)(args)
    except UsageError as error:
        code, result = USAGE, {"error": str(error)}
    except RecipeError as error:
        code, result = USAGE, {"error": f"recipe: {error}"}
    except ArtifactError as error:
        code, result = CORRUPT, {"error": str(error)}
    if args.json:
        print(json.dumps({"command": args.command, "exit_code": code, **result}, default=str))
    elif "error" in result:
        print(f"qcompile {args.command}: {result['error']}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
