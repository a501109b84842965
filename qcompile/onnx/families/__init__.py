"""ONNX forms of each scheme family: ``lower(site, scheme, packed, in_features, options) -> Lowering``.

One module per family (``integer``, ``w8a8``, ``fp8``, ``nf4``, ...), which documents its form; ``docs/onnx.md`` has
the table.

A family names its lowering in the registry (``Family.onnx = "module:function"``); a family without one gets a
clear error naming the layer.
"""

from __future__ import annotations

import torch

from qcompile.onnx.base import ExportOptions, Lowering, OnnxExportError
from qcompile.schemes import PackedWeight, Scheme, families, family_of


def lower_site(site: str, scheme: Scheme, packed: PackedWeight, in_features: int, options: ExportOptions) -> Lowering:
    """The ONNX form of one quantized site (raises :class:`OnnxExportError` naming the site); each family names
    its lowering in the family registry (``Family.onnx``)."""
    lower = family_of(scheme).onnx_lowering()
    if lower is None:
        exportable = ", ".join(f.name for f in families() if f.onnx is not None)
        raise OnnxExportError(
            f"layer {site}: scheme {scheme.name} (family {scheme.family}) has no ONNX translation; "
            f"exportable families: {exportable}. Re-plan this layer with one of them."
        )
    with torch.no_grad():
        return lower(site, scheme, packed, in_features, options)
