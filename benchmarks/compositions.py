"""Every entry point on every kind of source model: does it run, and does it give the source's own output?

Sources (tiny random Llama): ``float``; ``eager`` (``qcompile.quantize``); ``hf`` (``from_pretrained`` with
``qcompile.hf.QCompileConfig``). Entry points: ``quantize``, ``compile``, ``export`` + ``load``, ``onnx.export``,
``torch.compile(backend="qcompile")``. For a quantized source the entry point must keep its layers (the max
difference against the source's own logits is printed); for the float source, the entry point's quantization with
the same recipe is compared with ``qcompile.quantize``'s.

    python benchmarks/compositions.py
"""

from __future__ import annotations

import copy
import tempfile
import traceback
import warnings
from pathlib import Path

import torch

import qcompile
from qcompile.models import tiny_llama

RECIPE = "int4-g32"


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out


def sources(folder: Path) -> dict:
    from transformers import AutoModelForCausalLM

    float_model = tiny_llama()
    float_model.save_pretrained(folder / "float")
    hf = AutoModelForCausalLM.from_pretrained(folder / "float",
                                              quantization_config=qcompile.hf.QCompileConfig(recipe=RECIPE))  # fmt: skip
    hf.config.use_cache = False
    return {"float": float_model, "eager": qcompile.quantize(tiny_llama(), RECIPE, progress_bar=False), "hf": hf}


def entry_points(folder: Path) -> dict:
    def export_load(model, ids):
        path = folder / "m.qpt"
        qcompile.export(model, (), None if _quantized(model) else RECIPE, path, example_kwargs={"input_ids": ids},
                        progress_bar=False)  # fmt: skip
        return _logits(qcompile.load(path)(input_ids=ids))

    def onnx_export(model, ids):
        import qcompile.onnx  # noqa: F401

        report = qcompile.onnx.export(model, (), folder / "m.onnx", None if _quantized(model) else RECIPE,
                                      example_kwargs={"input_ids": ids})  # fmt: skip
        return f"ran in onnxruntime, {len(report.sites)} quantized sites"

    return {
        "quantize": lambda m, ids: _logits(qcompile.quantize(m, RECIPE, progress_bar=False)(input_ids=ids)),
        "compile": lambda m, ids: _logits(qcompile.compile(m, (), RECIPE, example_kwargs={"input_ids": ids},
                                                           progress_bar=False)(input_ids=ids)),  # fmt: skip
        "export + load": export_load,
        "onnx.export": onnx_export,
        "torch.compile": lambda m, ids: _logits(torch.compile(m, backend="qcompile", options=(
            {} if _quantized(m) else {"recipe": RECIPE}))(input_ids=ids)),
    }


def _quantized(model) -> bool:
    return any(isinstance(m, qcompile.nn.QuantizedLinear) for m in model.modules())


def main() -> int:
    warnings.simplefilter("ignore")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = _logits(qcompile.quantize(tiny_llama(), RECIPE, progress_bar=False)(input_ids=ids)).detach()
    print("| entry point | " + " | ".join(["float", "eager-quantized", "from_pretrained (QCompileConfig)"]) + " |")
    print("|---|---|---|---|")
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        models = sources(folder)
        for name, run in entry_points(folder).items():
            cells = []
            for source, model in models.items():
                try:
                    with torch.no_grad():
                        out = run(copy.deepcopy(model), ids)
                    if isinstance(out, torch.Tensor):
                        diff = (out.detach() - reference).abs().max().item()
                        cells.append(f"ok, max diff {diff:.1e}")
                        failures += diff > 1e-4
                    else:
                        cells.append(f"ok, {out}")
                except Exception as error:  # noqa: BLE001 - the table reports it
                    failures += 1
                    cells.append(f"FAILED: {type(error).__name__}: {str(error)[:80]}")
                    traceback.print_exc()
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
