"""``nvfp4`` in ONNX: the FP4 form of :mod:`qcompile.onnx.families.mxfp4`, with each group's unit ``float(e4m3 scale)
* global_scale`` (float32, as the reference computes it); ``nvfp4-w4a4…`` gives a clear error."""

from __future__ import annotations

from qcompile.onnx.families.mxfp4 import lower_fp4


def lower(site, scheme, packed, in_features, options):
    return lower_fp4(site, scheme, packed, in_features, options)
