"""``qcompile.onnx.export``: a float model + recipe, or a built :class:`qcompile.QuantizedProgram`, to an ONNX
file whose matmuls stay quantized, validated in onnxruntime.

Flow: compile (if needed) → copy the lowered graph → :func:`prepare_for_onnx` (each ``qcompile::linear`` to
its ONNX form) → ``torch.onnx.export`` (dynamo, opset 21, our translations) → :func:`finish_model` →
checker → atomic save → :func:`validate`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
import warnings

import onnx
import torch
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from qcompile.onnx.base import ExportOptions, OnnxExportError
from qcompile.onnx.postprocess import finish_model, plan_metadata, save_atomic
from qcompile.onnx.prepare import PreparedSite, prepare_for_onnx
from qcompile.onnx.translations import OPSET, TRANSLATION_TABLE
from qcompile.onnx.validate import (
    ACTIVATION_QUANTIZED_RELATIVE_TOLERANCE,
    RELATIVE_TOLERANCE,
    Comparison,
    validate,
)
from qcompile.schemes import parse_scheme


@dataclasses.dataclass
class ExportReport:
    """What was written: per-site ONNX forms, byte counts, and the onnxruntime comparisons."""

    path: str
    sites: list[PreparedSite]
    file_bytes: int
    quantized_bytes: int  # the ONNX-layout tensors of the quantized sites
    initializer_bytes: int  # every initializer in the file
    comparisons: list[Comparison]
    seconds: dict[str, float]

    @property
    def max_abs_diff(self) -> float:
        return max((c.max_abs_diff for c in self.comparisons), default=float("nan"))

    def table(self) -> str:
        rows = [f"{'site':<40} {'scheme':<14} {'ONNX':<32} {'bytes':>10}"]
        for s in self.sites:
            rows.append(f"{s.site:<40} {s.scheme:<14} {s.lowering.onnx_op:<32} {s.lowering.nbytes:>10,}")
        rows.append(f"file {self.path}: {self.file_bytes:,} bytes ({self.quantized_bytes:,} quantized, "
                    f"{self.initializer_bytes - self.quantized_bytes:,} float or other initializers)")  # fmt: skip
        for c in self.comparisons:
            rows.append(f"onnxruntime vs qcompile, inputs {c.inputs}, output {c.output}: max |diff| "
                        f"{c.max_abs_diff:.3g} (relative {c.relative:.2g}, bound {c.bound:.3g})")  # fmt: skip
        return "\n".join(rows)


def _program_dynamic_shapes(gm: torch.fx.GraphModule) -> dict:
    """``{input name: {axis: Dim.AUTO}}`` for the axes the captured program keeps symbolic (batch, sequence…)."""
    shapes = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            dims = enumerate(value.shape)
            shapes[node.target] = {axis: torch.export.Dim.AUTO for axis, size in dims if not is_concrete_int(size)}
        else:
            shapes[node.target] = None
    return shapes


def _as_program(model_or_program, example_args, recipe, example_kwargs, dynamic_shapes):
    import qcompile

    if isinstance(model_or_program, qcompile.QuantizedProgram):
        if recipe is not None:
            raise OnnxExportError("a built QuantizedProgram already has its plan: drop the recipe argument")
        return model_or_program
    if not isinstance(model_or_program, torch.nn.Module):
        kind = type(model_or_program).__name__
        raise OnnxExportError(f"export takes an nn.Module or a QuantizedProgram, got {kind}")
    if recipe is None:
        from qcompile.nn import QuantizedLinear

        if not any(isinstance(m, QuantizedLinear) for m in model_or_program.modules()):
            raise OnnxExportError("a float model needs a recipe (for example 'int4-g128') to be quantized before "
                                  "export")  # fmt: skip
        recipe = {"default": None}  # quantized already (qcompile.quantize, from_pretrained): its float layers stay
    return qcompile.compile(model_or_program, example_args, recipe, example_kwargs=example_kwargs,
                            dynamic_shapes=dynamic_shapes, progress_bar=False)  # fmt: skip


def export(model_or_program, example_args=(), path: str | os.PathLike = "model.onnx", recipe=None, *,
           example_kwargs=None, dynamic_shapes=None, int4_format: str = "matmulnbits", atol: float | None = None,
           validate_outputs: bool = True) -> ExportReport:  # fmt: skip
    """Export a quantized model to ONNX and check it in onnxruntime.

    ``model_or_program``: a float ``nn.Module`` (quantized with ``recipe`` through :func:`qcompile.compile`), a
    model quantized already (:func:`qcompile.quantize`, ``from_pretrained``: its quantized layers are taken as they
    are, a ``recipe`` then applies to its float layers only) or a :class:`qcompile.QuantizedProgram`. ``example_args``/``example_kwargs``: inputs as the model takes them (a
    program's own examples when omitted). ``dynamic_shapes``: as for ``torch.export``; by default every axis the
    model lets vary stays dynamic (batch, sequence). ``int4_format``: ``"matmulnbits"`` or ``"qdq"``.
    ``atol``: largest accepted ``max |onnxruntime - qcompile|`` (default: 1e-3 of the largest output value, 1e-1
    when some layer quantizes activations at run time, see ``docs/onnx.md``).
    Raises :class:`OnnxExportError` (a layer or scheme that cannot be exported, or a failed validation).
    """
    options = ExportOptions(int4_format)
    seconds = {}
    start = time.perf_counter()
    program = _as_program(model_or_program, example_args, recipe, example_kwargs, dynamic_shapes)
    seconds["compile"] = time.perf_counter() - start
    args = tuple(example_args) if isinstance(example_args, (list, tuple)) else (example_args,)
    args = args or tuple(program.example_args)
    kwargs = dict(example_kwargs or program.example_kwargs or {})
    shapes = dynamic_shapes or program.dynamic_shapes

    start = time.perf_counter()
    gm = copy.deepcopy(program.module)
    sites = prepare_for_onnx(gm, options)
    if shapes is None:
        shapes = _program_dynamic_shapes(program.module)
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)  # "torchvision is not installed" notices are not about this model
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        exported = torch.onnx.export(
            gm, args, kwargs=kwargs, dynamic_shapes=shapes, custom_translation_table=TRANSLATION_TABLE,
            opset_version=OPSET, dynamo=True, optimize=False, verbose=False,
        )  # fmt: skip
        _optimize(exported.model, sites)
    registry_log.setLevel(level)
    seconds["export"] = time.perf_counter() - start
    model = exported.model_proto
    import qcompile

    finish_model(model, sites, plan_metadata(sites, options.int4_format, qcompile.__version__))
    onnx.checker.check_model(model)
    save_atomic(model, path)
    comparisons = []
    if validate_outputs:
        start = time.perf_counter()
        activations = any(parse_scheme(s.scheme).quantizes_activations for s in sites)
        rtol = ACTIVATION_QUANTIZED_RELATIVE_TOLERANCE if activations else RELATIVE_TOLERANCE
        comparisons = validate(path, program, args, kwargs, atol, rtol)
        seconds["validate"] = time.perf_counter() - start
    quantized = sum(s.lowering.nbytes for s in sites)
    initializers = sum(_tensor_bytes(t) for t in model.graph.initializer)
    return ExportReport(os.fspath(path), sites, os.path.getsize(path), quantized, initializers, comparisons, seconds)


def _optimize(model, sites: list[PreparedSite]) -> None:
    """onnxscript's constant folding and cleanup, except on quantized weights: folding a dequantization
    whose inputs are all initializers would write the float weight into the file."""
    import onnxscript.optimizer

    quantized = {path for s in sites for path in s.paths.values()}

    def should_fold(node):
        return False if any(v is not None and v.name in quantized for v in node.inputs) else None

    onnxscript.optimizer.optimize_ir(model, should_fold=should_fold)


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    return onnx.numpy_helper.to_array(tensor).nbytes
