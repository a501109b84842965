"""The ``qcompile`` command line: quantize a model to a ``.qpt`` file, inspect, verify, generate, evaluate.

    qcompile quantize smollm2 --recipe int4-g128 -o smollm2.qpt
    qcompile inspect smollm2.qpt
    qcompile verify smollm2.qpt
    qcompile generate smollm2.qpt --prompt "The king said" --max-new-tokens 20
    qcompile eval smollm2.qpt --text qcompile/data/macbeth.txt
    qcompile report smollm2 --recipe int4-g128 -o smollm2-report     # .txt, .json and .png

Exit codes: 0 ok, 1 verification failed or perplexity above ``--max-perplexity``, 2 any other error (bad
arguments, missing file, bad recipe, a model or option the command cannot take: one line, no traceback;
``QCOMPILE_DEBUG=1`` shows it), 3 the ``.qpt`` file is corrupt or unsafe. ``--json`` prints one JSON object.
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
    if getattr(args, "format", "qpt") in STREAMED_FORMATS:
        return _quantize_streaming(args)
    model, tokenizer, task = _load_model(args.model)
    if getattr(args, "format", "qpt") == "gguf":
        return _quantize_gguf(args, recipe, model, tokenizer)
    inputs = _example_inputs(model, tokenizer, task)
    calibration = _calibration(args, recipe, tokenizer)
    start = time.perf_counter()
    program = export(model, (), recipe, args.output, example_kwargs=inputs, progress_bar=not args.json,
                     calibration=calibration, metadata={"source": args.model, "task": task})  # fmt: skip
    plan = program.plan
    result = {"output": args.output, "bytes": os.path.getsize(args.output),
              "seconds": round(time.perf_counter() - start, 2), "sites": len(plan), "quantized": len(plan.quantized()),
              "weights_before": plan.bytes_before, "weights_after": plan.bytes_after}  # fmt: skip
    if not args.json:
        print(plan.table())
        print(f"wrote {args.output} ({_mib(result['bytes'])}) in {result['seconds']} s")
    return OK, result


STREAMED_FORMATS = ("hf", "compressed-tensors")


def _quantize_streaming(args) -> tuple[int, dict]:
    """``--format hf|compressed-tensors``: stream a local float checkpoint (``qcompile.hf.streaming``)."""
    from qcompile.hf.streaming import quantize_checkpoint

    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise UsageError(f"--format {args.format} reads a Hugging Face checkpoint directory (with config.json); "
                         f"{args.model!r} is not one")  # fmt: skip
    if getattr(args, "calibration", None):
        raise UsageError(f"--calibration is not taken with --format {args.format} yet: the streamed GPTQ / AWQ "
                         "calibrate on the checkpoint's own tokenizer and the built-in text")  # fmt: skip
    report = quantize_checkpoint(args.model, args.output, args.recipe, format=args.format,
                                 max_shard_bytes=args.max_shard_mib << 20, progress=not args.json)  # fmt: skip
    plan = report.plan
    result = {"output": args.output, "format": args.format, "bytes": report.bytes_written, "files": len(report.files),
              "seconds": round(report.seconds, 2), "sites": len(plan), "quantized": len(plan.quantized()),
              "peak_rss": report.peak_rss, "dropped": report.dropped}  # fmt: skip
    if not args.json:
        print(plan.table())
        print(report.summary())
    return OK, result


def _calibration(args, recipe, tokenizer):
    """Calibration batches for recipes whose algorithm needs them (GPTQ, AWQ, SmoothQuant): ``--calibration FILE``
    (UTF-8 text, cut into 512-token samples), else the built-in text through the model's tokenizer."""
    from qcompile.algorithms import get_algorithm

    algorithms = {recipe.algorithm, *(rule.algorithm for rule in recipe.overrides if rule.algorithm)}
    if not any(get_algorithm(a).needs_calibration for a in algorithms if a):
        if getattr(args, "calibration", None):
            raise UsageError(f"--calibration: the recipe's algorithms ({', '.join(sorted(algorithms))}) take no "
                             "calibration data")  # fmt: skip
        return None
    if tokenizer is None:
        raise UsageError(f"the {', '.join(sorted(algorithms))} algorithm needs calibration text and a tokenizer: "
                         "pass a Hugging Face directory or a built-in model name, and --calibration FILE")  # fmt: skip
    if not getattr(args, "calibration", None):
        return tokenizer
    if not os.path.isfile(args.calibration):
        raise UsageError(f"--calibration: {args.calibration!r} is not a file")
    import torch

    ids = tokenizer(open(args.calibration, encoding="utf-8").read(), return_tensors="pt")["input_ids"][0]
    samples = [ids[i : i + 512].unsqueeze(0) for i in range(0, ids.numel() - 511, 512)][:64]
    if not samples:
        raise UsageError(f"--calibration: {args.calibration!r} holds {ids.numel()} tokens, fewer than one "
                         "512-token sample")  # fmt: skip
    return [torch.as_tensor(s) for s in samples]


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


def cmd_report(args) -> tuple[int, dict]:
    """The per-layer report (:mod:`qcompile.layer_report`): a model and a recipe (kernel and output error per
    layer), or a ``.qpt`` file (kernel per layer; the error needs the float model)."""
    from qcompile.layer_report import layer_report, report_for_plan

    if os.path.isfile(args.source) and args.source.endswith(".qpt"):
        from qcompile.export import load

        program = load(args.source)
        weights = dict(program.module.named_buffers())
        packed = {}
        for entry, row in zip(program.plan.entries, program.manifest["plan"]):
            if entry.scheme is not None:
                packed[entry.site.name] = [weights[name] for name in row["tensors"].values()]
        report = report_for_plan(program.plan, packed)
    else:
        from qcompile.recipe import load_recipe

        recipe = load_recipe(args.recipe)
        model, tokenizer, task = _load_model(args.source)
        inputs = _example_inputs(model, tokenizer, task)
        report = layer_report(model, recipe, [inputs], calibration=_calibration(args, recipe, tokenizer))
    written = {}
    if args.output:
        for suffix, text in ((".txt", report.table()), (".json", report.to_json())):
            with open(args.output + suffix, "w", encoding="utf-8") as handle:
                handle.write(text + "\n")
            written[suffix] = args.output + suffix
        report.plot(args.output + ".png")
        written[".png"] = args.output + ".png"
    if not args.json:
        print(report.table())
        if written:
            print("wrote " + ", ".join(written.values()))
    return OK, {"rows": len(report.rows), "files": list(written.values())}


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
    if args.max_perplexity is None:  # no threshold, no verdict: the number is the result
        _say(args, result)
        return OK, result
    failed = not math.isfinite(value) or value > args.max_perplexity
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
    p.add_argument("-o", "--output", required=True,
                   help="the .qpt (or .gguf) file to write; a directory for --format hf / compressed-tensors")
    p.add_argument("--format", choices=("qpt", "gguf", *STREAMED_FORMATS), default="qpt",
                   help="qpt (default); gguf: a llama.cpp file (gguf schemes, q4_0 … q6_k); hf / compressed-tensors: "
                        "a Hugging Face checkpoint directory, streamed from a local float checkpoint one tensor (or "
                        "decoder block) at a time")
    p.add_argument("--max-shard-mib", type=int, default=5120,
                   help="hf / compressed-tensors: most MiB of tensors per output shard")
    p.add_argument("--calibration", help="UTF-8 text for GPTQ / AWQ / SmoothQuant (default: the built-in text)")
    p = sub.add_parser("report", help="per-layer report: kernel and output error per layer (table, JSON, PNG)")
    p.add_argument("source", help=f"a .qpt file, a built-in name ({names}), a Hugging Face directory or a .gguf")
    p.add_argument("--recipe", default="int4-g128", help="the recipe to report on (for a model source)")
    p.add_argument("--calibration", help="UTF-8 text for GPTQ / AWQ / SmoothQuant (default: the built-in text)")
    p.add_argument("-o", "--output", help="write OUTPUT.txt, OUTPUT.json and OUTPUT.png")
    p = sub.add_parser("inspect", help="per-layer table of a .qpt file")
    p.add_argument("file")
    p = sub.add_parser("verify", help="check every checksum and replay the stored example")
    p.add_argument("file")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tolerance", type=float, default=1e-2, help="max error relative to the output's max (1e-2)")
    for name, helptext in (("generate", "text generation (greedy or sampled)"), ("eval", "perplexity on a text file")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("file")
        p.add_argument("--tokenizer", help="a Hugging Face directory or built-in name (default: the model's source)")
        if name == "generate":
            p.add_argument("--prompt", required=True)
            p.add_argument("--max-new-tokens", type=int, default=32)
            p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
            p.add_argument("--temperature", type=float, default=1.0)
            p.add_argument("--top-k", type=int)
            p.add_argument("--top-p", type=float)
            p.add_argument("--seed", type=int, help="seed of the sampling")
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
            "eval": cmd_eval, "report": cmd_report}  # fmt: skip


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
    except KeyboardInterrupt:
        code, result = USAGE, {"error": "interrupted"}
    except Exception as error:  # noqa: BLE001 - one line, no traceback (QCOMPILE_DEBUG=1 shows it)
        if os.environ.get("QCOMPILE_DEBUG"):
            raise
        code, result = USAGE, {"error": f"{type(error).__name__}: {error}"}
    if args.json:
        print(json.dumps({"command": args.command, "exit_code": code, **result}, default=str))
    elif "error" in result:
        print(f"qcompile {args.command}: {result['error']}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
