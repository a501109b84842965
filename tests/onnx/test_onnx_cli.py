"""``qcompile export-onnx``: arguments and the usage-error exit code."""

from __future__ import annotations

import argparse

from qcompile.onnx.cli import USAGE, add_subparser, main


def test_parser_defaults():
    parser = argparse.ArgumentParser()
    add_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export-onnx", "minilm", "-o", "m.onnx"])
    assert (args.recipe, args.int4_format, args.atol, args.no_validate) == ("int4-g128", "matmulnbits", None, False)


def test_unexportable_scheme_is_a_usage_error(tmp_path, capsys):
    code = main(["export-onnx", "tiny-llama", "--recipe", "int3-g32", "-o", str(tmp_path / "x.onnx")])
    assert code == USAGE
    assert "int3-g32" in capsys.readouterr().out
    assert not (tmp_path / "x.onnx").exists()
