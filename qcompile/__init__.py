"""qcompile: a PyTorch 2 quantization compiler.

    import qcompile
    qcompile.quantize(model, {"default": "int4-g128", "overrides": [{"targets": ["*.down_proj"], "scheme": "int8"}]})
    program = qcompile.compile(model, (input_ids,), "int8")          # torch.export path
    compiled = torch.compile(model, backend="qcompile", options={"recipe": "int4-g32"}, dynamic=True)
"""

__version__ = "0.1.0"

from qcompile import runtime  # noqa: F401,E402  (registers torch.ops.qcompile.*)
from qcompile.api import QuantizedProgram, compile, quantize  # noqa: E402
from qcompile.plan import Plan, Site, make_plan  # noqa: E402
from qcompile.recipe import Recipe, RecipeError, load_recipe  # noqa: E402
from qcompile.schemes import Scheme, SchemeError, parse_scheme  # noqa: E402
from qcompile.export import export, load  # noqa: E402  (the module stays importable as qcompile.export)
from qcompile.runtime.qpt_format import ArtifactError  # noqa: E402
import qcompile.hf  # noqa: F401,E402  (registers quant_method="qcompile" with transformers, once that is imported)

__all__ = [
    "ArtifactError", "Plan", "QuantizedProgram", "Recipe", "RecipeError", "Scheme", "SchemeError", "Site", "compile",
    "export", "load", "load_recipe", "make_plan", "parse_scheme", "quantize",
]  # fmt: skip


def __getattr__(name: str):
    """``qcompile.onnx`` (and ``qcompile.gguf``) without an import of their own: loaded on first use, since they
    import onnx / gguf, which plain quantization does not need."""
    if name in ("onnx", "gguf"):
        import importlib

        return importlib.import_module(f"qcompile.{name}")
    raise AttributeError(f"module 'qcompile' has no attribute {name!r}")
