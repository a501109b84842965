"""The quantize-on-load operation transformers runs on each checkpoint weight a planned site reads.

transformers 5 reads the checkpoint one tensor at a time; for a key the quantizer's ``param_needs_quantization``
claims, it calls :meth:`QuantizeOnLoad.convert` with that float tensor and loads what comes back by name. The op
packs the weight with :func:`qcompile.quantizer.quantize_entry` (the plan entry decides scheme, algorithm and
options), drops the module's float placeholder, and returns the packed tensors under the module's buffer names
(``<site>.qweight``, ``<site>.scales``, ...). The float tensor is freed before the next weight is read, and the
memory it and the quantization's temporaries took is given back (:mod:`qcompile.hf.memory`).
"""

from __future__ import annotations

import torch
from transformers.core_model_loading import ConversionOps

from qcompile.hf.memory import release_file_pages, trim_heap
from qcompile.hf.modules import PLACEHOLDER
from qcompile.quantizer import quantize_entry


class QuantizeOnLoad(ConversionOps):
    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict, source_patterns=None, target_patterns=None, full_layer_name=None,
                model=None, config=None, missing_keys=None, **kwargs) -> dict[str, torch.Tensor]:  # fmt: skip
        out = {}
        pending = self.hf_quantizer.pending
        for key, value in input_dict.items():
            tensor = value[0] if isinstance(value, list) else value
            entry = pending.pop(key, None)
            if entry is None:
                out[key] = tensor
                continue
            packed = quantize_entry(entry, tensor)
            release_file_pages(tensor)
            module = model.get_submodule(entry.site.name)
            module._parameters.pop(PLACEHOLDER, None)
            if missing_keys is not None:
                missing_keys.discard(key)
            for name, packed_tensor in packed.tensors().items():
                out[f"{entry.site.name}.{name}"] = packed_tensor
        trim_heap()
        return out

    @property
    def reverse_op(self) -> ConversionOps:
        raise NotImplementedError("qcompile: a model quantized on load saves its packed tensors as they are")
