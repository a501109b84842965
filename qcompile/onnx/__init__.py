"""ONNX export of quantized programs, validated in onnxruntime (see ``docs/onnx.md``).

    import qcompile.onnx
    report = qcompile.onnx.export(model, (input_ids,), "model.onnx", recipe="int4-g128")
    print(report.table())
"""

from qcompile.onnx.cli import add_subparser, run
from qcompile.onnx.base import INT4_FORMATS, ExportOptions, OnnxExportError
from qcompile.onnx.exporter import ExportReport, export
from qcompile.onnx.validate import OnnxValidationError, session

__all__ = ["ExportOptions", "ExportReport", "INT4_FORMATS", "OnnxExportError", "OnnxValidationError", "add_subparser",
           "export", "run", "session"]  # fmt: skip
