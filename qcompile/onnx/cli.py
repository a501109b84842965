"""``qcompile export-onnx``: quantize a model and write a validated ONNX file.

    qcompile export-onnx minilm --recipe int8 -o minilm.onnx
    qcompile export-onnx tiny-llama --recipe int4-g32 --int4-format qdq -o llama.onnx

Exit codes follow ``qcompile``: 0 ok, 1 onnxruntime disagrees with qcompile (the file is still written),
2 usage error (bad arguments, a recipe naming a scheme that has no ONNX form).

Wiring into ``qcompile/cli.py``: call ``add_subparser(sub)`` in ``build_parser`` before the loop that adds
``--json`` to every command, and add ``"export-onnx": qcompile.onnx.cli.command`` to ``COMMANDS`` (it returns
``(exit code, result)`` like the other commands and prints the per-site table unless ``--json``).
"""

from __future__ import annotations

import argparse
import json
import time

from qcompile.onnx.base import INT4_FORMATS

OK, FAILED, USAGE = 0, 1, 2
COMMAND = "export-onnx"


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Add the ``export-onnx`` command to ``subparsers`` (from ``parser.add_subparsers()``)."""
    p = subparsers.add_parser(COMMAND, help="quantize a model and write an ONNX file checked in onnxruntime")
    p.add_argument("model", help="a built-in name (smollm2, minilm, tiny-llama), a Hugging Face directory or a .gguf")
    p.add_argument("--recipe", default="int4-g128", help="a recipe file (YAML/JSON) or a scheme name (int4-g128)")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument("--int4-format", choices=INT4_FORMATS, default="matmulnbits",
                   help="int4 as com.microsoft::MatMulNBits (default) or standard DequantizeLinear (qdq)")  # fmt: skip
    p.add_argument("--atol", type=float, help="largest accepted |onnxruntime - qcompile| (default 1e-3 of the output)")
    p.add_argument("--no-validate", action="store_true", help="skip the onnxruntime comparison")
    return p


def command(args) -> tuple[int, dict]:
    """Run the command; ``(exit code, result)`` as the other ``qcompile`` commands return them."""
    from qcompile.cli.common import UsageError, example_inputs, load_model
    from qcompile.onnx.base import OnnxExportError
    from qcompile.onnx.exporter import export
    from qcompile.onnx.validate import OnnxValidationError
    from qcompile.recipe import RecipeError, load_recipe

    start = time.perf_counter()
    try:
        recipe = load_recipe(args.recipe)
        model, tokenizer, task = load_model(args.model)
        inputs = example_inputs(model, tokenizer, task)
        report = export(model, (), args.output, recipe, example_kwargs=inputs, int4_format=args.int4_format,
                        atol=args.atol, validate_outputs=not args.no_validate)  # fmt: skip
    except OnnxValidationError as error:
        return FAILED, {"error": str(error), "output": args.output}
    except (OnnxExportError, RecipeError, UsageError) as error:
        return USAGE, {"error": str(error)}
    result = {
        "output": report.path, "bytes": report.file_bytes, "quantized_bytes": report.quantized_bytes,
        "seconds": round(time.perf_counter() - start, 2), "int4_format": args.int4_format,
        "sites": {s.site: {"scheme": s.scheme, "onnx": s.lowering.onnx_op} for s in report.sites},
        "max_abs_diff": None if not report.comparisons else report.max_abs_diff,
    }  # fmt: skip
    if not getattr(args, "json", False):
        print(report.table())
    return OK, result


def run(args) -> int:
    """Run the command and print its result (``--json``: one JSON object); returns the exit code."""
    code, result = command(args)
    if getattr(args, "json", False):
        print(json.dumps({"command": COMMAND, "exit_code": code, **result}, default=str))
    elif "error" in result:
        print(f"qcompile {COMMAND}: {result['error']}")
    return code


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: ``python -m qcompile.onnx.cli export-onnx …``."""
    parser = argparse.ArgumentParser(prog="qcompile")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    sub = add_subparser(parser.add_subparsers(dest="command", required=True))
    sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON object")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
