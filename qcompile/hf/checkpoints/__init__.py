"""Exact import of quantized checkpoints made by other tools: GPTQ, AWQ, compressed-tensors, bitsandbytes 4-bit and 8-bit.

    from qcompile.hf.checkpoints import load
    model = load("path/to/checkpoint")          # a transformers model whose quantized layers are qcompile layers

Each source format has one module (:mod:`.gptq`, :mod:`.awq`, :mod:`.compressed_tensors`, :mod:`.bitsandbytes`)
with the same two functions:

* ``layers(names, config, modules) -> {layer: (layer config, {local tensor name: checkpoint name})}``: which layers
  the checkpoint quantizes;
* ``convert(tensors, config, *, in_features, out_features, where) -> ImportedLinear``: one layer's tensors (local
  names) → a qcompile scheme name, that scheme's declared packed tensors holding the checkpoint's codes, and an
  optional static input permutation. :func:`convert_layer` picks the module by ``quant_method``.

The codes are re-laid, never re-quantized: integer zero points become float zeros exactly, 16-bit scales become
float32 exactly, and ``ImportedLinear.dequantized_weight()`` equals the source tool's own dequantization.
"""

from __future__ import annotations

from qcompile.hf.checkpoints.common import CheckpointError, ImportedLinear, PermutedQuantizedLinear
from qcompile.hf.checkpoints.loader import READERS, load, quantization_config


def convert_layer(tensors, config: dict, *, method: str | None = None, in_features=None, out_features=None,
                  where: str = "layer"):  # fmt: skip
    """One layer's tensors (local names) under a ``quantization_config`` (for compressed-tensors: the layer's config
    group with its ``format``) → :class:`ImportedLinear`, by ``method`` (default ``config["quant_method"]``)."""
    method = method or config.get("quant_method")
    if method not in READERS:
        raise CheckpointError(f"quant_method {method!r} is not supported (supported: {', '.join(READERS)})")
    return READERS[method].convert(tensors, config, in_features=in_features, out_features=out_features, where=where)


__all__ = ["CheckpointError", "ImportedLinear", "PermutedQuantizedLinear", "convert_layer", "load",
           "quantization_config"]  # fmt: skip
