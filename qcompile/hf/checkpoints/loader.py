"""Load a quantized Hugging Face checkpoint directory into a transformers model with qcompile layers.

:func:`load` reads ``config.json``'s ``quantization_config``, builds the model without weights (parameters on the
meta device, buffers real), swaps each quantized ``nn.Linear`` for the :class:`~qcompile.nn.QuantizedLinear` its
importer builds from the checkpoint's codes, loads every other tensor, and ties the output embedding to the input
one when the config says so. Tensor names must be the model's own parameter names (no renaming is applied).
"""

from __future__ import annotations

import json
import pathlib
import warnings

import torch

from qcompile.hf.checkpoints import aqlm, awq, bitsandbytes, compressed_tensors, gptq, spqr, vptq
from qcompile.hf.checkpoints.common import CheckpointError

READERS = {gptq.METHOD: gptq, awq.METHOD: awq, compressed_tensors.METHOD: compressed_tensors,
           bitsandbytes.METHOD: bitsandbytes, aqlm.METHOD: aqlm, spqr.METHOD: spqr, vptq.METHOD: vptq}  # fmt: skip


class Tensors:
    """The tensors of a checkpoint directory (``model.safetensors`` or the shards an index names), read on demand."""

    def __init__(self, path: pathlib.Path):
        from safetensors import safe_open

        index = path / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no .safetensors files")
        self._handles = [safe_open(str(path / f), framework="pt") for f in files]
        self._where = {name: h for h in self._handles for name in h.keys()}

    def names(self) -> list[str]:
        return list(self._where)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)


def quantization_config(path) -> dict:
    config = json.loads((pathlib.Path(path) / "config.json").read_text())
    qconfig = config.get("quantization_config")
    if not qconfig:
        raise CheckpointError(f"{path}/config.json has no quantization_config")
    return qconfig


def _empty_model(path: pathlib.Path, dtype: torch.dtype | None):
    import transformers
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # the layers below are qcompile's; transformers must not act on it
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    architecture = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, architecture, None) if architecture else None
    with init_empty_weights():
        if cls is not None:
            model = cls._from_config(config, dtype=dtype)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), dtype


def _set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def load(path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The transformers model of checkpoint directory ``path`` with every quantized linear layer a qcompile layer
    holding the checkpoint's codes exactly (GPTQ, AWQ GEMM, compressed-tensors, bitsandbytes 4-bit and 8-bit; see each
    importer's module). ``dtype`` is the float dtype of the remaining tensors (default: the config's ``dtype``).

    ``model.qcompile_import`` lists ``(layer, scheme, notes)`` per imported layer."""
    path = pathlib.Path(path)
    qconfig = quantization_config(path)
    method = qconfig.get("quant_method")
    reader = READERS.get(method)
    if reader is None:
        raise CheckpointError(f"{path}: quant_method {method!r} is not supported (supported: {', '.join(READERS)})")
    tensors = Tensors(path)
    model, dtype = _empty_model(path, dtype)
    modules = dict(model.named_modules())
    consumed: set[str] = set()
    report = []
    for layer, (layer_config, local_names) in reader.layers(tensors.names(), qconfig, modules).items():
        module = modules.get(layer)
        if not isinstance(module, torch.nn.Linear):
            kind = "nothing" if module is None else type(module).__name__
            raise CheckpointError(f"{layer}: the checkpoint quantizes it, the model has {kind} there, not a Linear")
        local = {short: tensors[full] for short, full in local_names.items()}
        imported = reader.convert(local, layer_config, in_features=module.in_features,
                                  out_features=module.out_features, where=layer)  # fmt: skip
        if (imported.bias is None) != (module.bias is None):
            has = "has no" if imported.bias is None else "has a"
            raise CheckpointError(f"{layer}.bias: the checkpoint {has} bias, the model's layer "
                                  f"{'has one' if module.bias is not None else 'has none'}")  # fmt: skip
        _set_module(model, layer, imported.module(dtype))
        consumed.update(local_names.values())
        report.append((layer, imported.scheme, imported.notes))
    rest = {}
    for name in tensors.names():
        if name not in consumed:
            tensor = tensors[name]
            rest[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    result = model.load_state_dict(rest, strict=False, assign=True)
    if result.unexpected_keys:
        warnings.warn(f"{path}: tensors the model does not have were skipped: {', '.join(result.unexpected_keys)}",
                      stacklevel=2)  # fmt: skip
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(output, torch.nn.Linear) and output.weight.is_meta and getattr(model.config, "tie_word_embeddings",
                                                                                   False):  # fmt: skip
        model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise CheckpointError(f"{path}: the checkpoint lacks {', '.join(missing)}")
    model.qcompile_import = report
    return model
