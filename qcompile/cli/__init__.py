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
import os
import sys

from qcompile.cli.common import BUILTIN_MODELS, CORRUPT, FAILED, OK, USAGE, UsageError  # noqa: F401 (exit codes)
from qcompile.cli.quantize import STREAMED_FORMATS, cmd_quantize, export_onnx
from qcompile.cli.inspect import cmd_inspect, cmd_report, cmd_verify
from qcompile.cli.run import cmd_eval, cmd_generate


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


def main(argv: list[str] | None = None) -> int:
    from qcompile.recipe import RecipeError
    from qcompile.runtime.qpt_format import ArtifactError

    args = build_parser().parse_args(argv)  # exits 2 on bad usage
    try:
        file = getattr(args, "file", None)
        if file is not None and not os.path.isfile(file):
            raise UsageError(f"{file!r} does not exist or is not a file")
        code, result = COMMANDS.get(args.command, export_onnx)(args)
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

