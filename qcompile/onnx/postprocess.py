"""After ``torch.onnx.export``: give 4-bit initializers their ONNX type, check that every quantized tensor
reached the file as such, drop per-node export metadata, record the plan, and save atomically."""

from __future__ import annotations

import json
import os
import tempfile

import onnx

from qcompile.onnx.base import OnnxExportError
from qcompile.onnx.prepare import PreparedSite

ONNX_TYPES = {"uint4": onnx.TensorProto.UINT4, "int4": onnx.TensorProto.INT4}
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
WEIGHT_KEYS = ("qweight", "B")  # the quantized weight of every ONNX form (see qcompile.onnx.ops)
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf cannot hold 2 GiB; larger models keep weights beside the file


def finish_model(model: onnx.ModelProto, sites: list[PreparedSite], metadata: dict[str, str]) -> None:
    """Retype, check and annotate ``model`` in place (see module docstring)."""
    initializers = {t.name: t for t in model.graph.initializer}
    for prepared in sites:
        for key, path in prepared.paths.items():
            tensor = initializers.get(path)
            if tensor is None and key not in WEIGHT_KEYS:
                continue  # a small tensor equal to another site's (NF4 levels) may be merged with it
            if tensor is None:
                raise OnnxExportError(
                    f"layer {prepared.site}: its quantized tensor {key} ({path}) is not an initializer of the "
                    f"exported graph (the exporter folded it away), so the file would hold a float copy. "
                    f"Please report this."
                )
            if key in prepared.lowering.onnx_types:
                tensor.data_type = ONNX_TYPES[prepared.lowering.onnx_types[key]]
                del tensor.dims[:]
                tensor.dims.extend(prepared.lowering.onnx_shapes[key])
            elif key in WEIGHT_KEYS and tensor.data_type in FLOAT_TYPES:
                raise OnnxExportError(f"layer {prepared.site}: weight {path} reached the file as a float tensor")
    del model.graph.value_info[:]  # shapes the exporter recorded for 4-bit values are of their uint8 carriers
    _strip_metadata(model.graph)
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)


def _strip_metadata(graph: onnx.GraphProto) -> None:
    """Stack traces and FX names per node: useful while debugging the exporter, large in small models."""
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _strip_metadata(attribute.g)
    for value in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]:
        del value.metadata_props[:]


def plan_metadata(sites: list[PreparedSite], int4_format: str, version: str) -> dict[str, str]:
    plan = {s.site: {"scheme": s.scheme, "onnx": s.lowering.onnx_op} for s in sites}
    return {"qcompile.version": version, "qcompile.int4_format": int4_format, "qcompile.plan": json.dumps(plan)}


def save_atomic(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``path`` through a temporary file and a rename: a crash leaves any old file intact.
    Models above 1.8 GB keep their weights in ``<path>.data`` next to it."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    large = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    fd, tmp = tempfile.mkstemp(prefix=".qcompile-", suffix=".onnx", dir=directory)
    os.close(fd)
    try:
        if large:
            location = os.path.basename(path) + ".data"
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=location)
        else:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
