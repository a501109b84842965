"""ONNX forms of each scheme family: ``lower(site, scheme, packed, in_features, options) -> Lowering``.

| family (:mod:`qcompile.schemes`) | ONNX form                                                                  |
|----------------------------------|----------------------------------------------------------------------------|
| `int-weight-only`, 8 bits        | `DequantizeLinear` (per channel or `block_size`) + `MatMul`                 |
| `int-weight-only`, 4 bits        | `com.microsoft::MatMulNBits`; `DequantizeLinear` on `int4`/`uint4` (`"qdq"`) |
| `int-weight-only`, 2 bits        | `com.microsoft::MatMulNBits` (ONNX has no 2-bit type)                        |
| `int-weight-only`, 3 bits        | not exportable: a clear error                                              |
| `w8a8-int8`                      | per-token int8 activation quantization + `MatMulInteger`                   |
| `fp8`                            | `DequantizeLinear` on `float8e4m3fn` + `MatMul`; `fp8-w8a8`: a clear error  |
| `nf4`                            | nibble unpack + `Gather` of the 16 levels + `MatMul`                        |

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
