"""``qcompile quantize``: a model and a recipe to a ``.qpt`` file, a streamed checkpoint, a GGUF file or ONNX."""

from __future__ import annotations

import os
import time

from qcompile.cli.common import OK, UsageError, example_inputs, load_model, mib


def cmd_quantize(args) -> tuple[int, dict]:
    from qcompile.export import export
    from qcompile.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if getattr(args, "format", "qpt") in STREAMED_FORMATS:
        return _quantize_streaming(args)
    model, tokenizer, task = load_model(args.model)
    if getattr(args, "format", "qpt") == "gguf":
        return _quantize_gguf(args, recipe, model, tokenizer)
    inputs = example_inputs(model, tokenizer, task)
    calibration = calibration_for(args, recipe, tokenizer)
    start = time.perf_counter()
    program = export(model, (), recipe, args.output, example_kwargs=inputs, progress_bar=not args.json,
                     calibration=calibration, metadata={"source": args.model, "task": task})  # fmt: skip
    plan = program.plan
    result = {"output": args.output, "bytes": os.path.getsize(args.output),
              "seconds": round(time.perf_counter() - start, 2), "sites": len(plan), "quantized": len(plan.quantized()),
              "weights_before": plan.bytes_before, "weights_after": plan.bytes_after}  # fmt: skip
    if not args.json:
        print(plan.table())
        print(f"wrote {args.output} ({mib(result['bytes'])}) in {result['seconds']} s")
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


def calibration_for(args, recipe, tokenizer):
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
        print(f"wrote {args.output} ({mib(result['bytes'])}) in {result['seconds']} s")
    return OK, result


def export_onnx(args) -> tuple[int, dict]:
    from qcompile.onnx.cli import command

    return command(args)
