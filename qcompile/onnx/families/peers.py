"""The peer families (``quanto``, ``torchao``, ``eetq``; :mod:`qcompile.schemes.peers`) in ONNX.

A weight-only peer scheme keeps an ``int-weight-only`` or ``fp8`` layout and is exported as that layout's scheme
(``qcompile.onnx.families.integer`` / ``fp8``): the ONNX graph computes ``(u - z) * s`` / ``q * s`` in float32,
which is the peer's weight for float32 activations. Forms that quantize activations at run time (quanto ``-a8``,
torchao ``-a8``) have no ONNX form yet: a clear error naming the layer.
"""

from __future__ import annotations

from qcompile.onnx.base import OnnxExportError
from qcompile.schemes import PackedWeight, family_of


def lower(site, scheme, packed, in_features, options):
    if scheme.quantizes_activations:
        weight_only = scheme.name.replace("-a8", "")
        raise OnnxExportError(
            f"layer {site}: {scheme.name} quantizes activations at run time ({scheme.activation_mode}), which has no "
            f"ONNX export yet; re-plan this layer as {weight_only} (weight-only) to export it."
        )
    layout = scheme.layout
    tensors = {spec.name: packed[spec.name] for spec in layout.tensors(packed.qweight.shape[0], in_features)}
    return family_of(layout).onnx_lowering()(site, layout, PackedWeight(tensors), in_features, options)
