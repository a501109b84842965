"""Write a Llama-family transformers model quantized with ``gguf`` schemes as a GGUF file llama.cpp loads.

``save(model, path, tokenizer=None, float_type="f32", pre=None)``:

* every ``QuantizedLinear`` of a ``gguf`` scheme is written as its blocks, unchanged, with its ggml type; ``attn_q`` /
  ``attn_k`` rows are permuted to llama.cpp's order (whole rows of blocks, exact). A layer of another family, or whose
  ``in_features`` is not a whole number of blocks (a GGUF row holds no padding), is refused by name;
* float linears are written F32 (or F16 with ``float_type="f16"``), norms F32;
* the output: when ``lm_head`` holds exactly the embedding (tied float weights, or ``gguf`` blocks that dequantize to
  the embedding — what :func:`qcompile.gguf.load` makes of a tied file) only ``token_embd`` is written (with those
  blocks), as llama.cpp ties a missing ``output.weight``; otherwise ``token_embd`` is float and ``output`` separate;
* metadata: ``general.architecture``, ``general.name``, the ``llama.*`` keys llama.cpp reads (from the config),
  ``general.file_type`` (the llama ftype of the most common block type by elements; k-quants as the ``_M`` variant),
  ``general.quantization_version = 2``, and the tokenizer (``tokenizer.ggml.*`` from ``tokenizer``, see
  :mod:`qcompile.gguf.tokenizer`). A model loaded by :func:`qcompile.gguf.load` keeps its file's metadata; those keys
  are written again (in their order, with their types) unless recomputed here.
"""

from __future__ import annotations

import os

import torch

from qcompile.gguf import llama
from qcompile.gguf.reader import TYPE_IDS
from qcompile.gguf.writer import ARRAY, STRING, UINT32, write

#: llama.cpp ``llama_ftype`` for the most common block type
FILE_TYPES = {"F32": 0, "F16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k": 12,
              "q4_k": 15, "q5_k": 17, "q6_k": 18, "iq4_nl": 25, "iq4_xs": 30}  # fmt: skip
_LAYER_ORDER = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


def _float_entry(name, weight: torch.Tensor, float_type: str):
    dtype = {"f32": torch.float32, "f16": torch.float16}[float_type]
    data = weight.detach().to(dtype).contiguous()
    return name, TYPE_IDS["F32" if dtype == torch.float32 else "F16"], tuple(reversed(data.shape)), data


def _quantized_entry(name, module, heads):
    from qcompile.schemes import parse_scheme

    scheme = parse_scheme(module.scheme)
    if scheme.family != "gguf":
        raise ValueError(f"GGUF export: layer {name} is {scheme.name} (family {scheme.family}); a GGUF file holds "
                         f"ggml block types (q4_0 … iq4_xs) or floats")  # fmt: skip
    kind = scheme.kind
    if module.in_features % kind.qk:
        raise ValueError(f"GGUF export: layer {name} ({scheme.name}) has in_features {module.in_features}, not a "
                         f"multiple of its block size {kind.qk}: a GGUF row holds whole blocks and no padding "
                         f"(llama.cpp falls back to a 32-element type such as q5_0 or iq4_nl there)")  # fmt: skip
    blocks = module.packed()[0]
    if heads:
        blocks = llama.permute_rows(blocks, heads)
    return name, kind.type_id, (module.in_features, module.out_features), blocks.contiguous(), kind.name


def _is_gguf_quantized(module) -> bool:
    from qcompile.nn import QuantizedLinear
    from qcompile.schemes import parse_scheme

    return isinstance(module, QuantizedLinear) and parse_scheme(module.scheme).family == "gguf"


def _tensors(model, config, float_type):
    from qcompile.nn import QuantizedLinear

    entries, kinds = [], []

    def linear(name, module, heads=None):
        if isinstance(module, QuantizedLinear):
            if getattr(module, "input_divisor", None) is not None:
                raise ValueError(f"{name}: an explicit input scale (AWQ / SmoothQuant explicit_scales) has no GGUF "
                                 "form; quantize without that option")  # fmt: skip
            *entry, kind = _quantized_entry(name, module, heads)
            entries.append(tuple(entry))
            kinds.append((kind, module.in_features * module.out_features))
            return
        weight = module.weight.detach()
        entries.append(_float_entry(name, llama.permute_rows(weight, heads) if heads else weight, float_type))
        if getattr(module, "bias", None) is not None:
            bias = module.bias.detach()
            entries.append(_float_entry(name.replace(".weight", ".bias"),
                                        llama.permute_rows(bias, heads) if heads else bias, "f32"))  # fmt: skip

    embed = model.get_submodule("model.embed_tokens").weight.detach()
    head = model.get_submodule("lm_head")
    tied_blocks = _is_gguf_quantized(head) and torch.equal(head.dequantized_weight(), embed.to(torch.float32))
    embedding = model.get_submodule("model.embed_tokens").weight
    tied_float = not isinstance(head, QuantizedLinear) and head.weight is embedding
    if tied_blocks:
        linear("token_embd.weight", head)
    else:
        entries.append(_float_entry("token_embd.weight", embed, float_type))
        if not tied_float:
            linear("output.weight", head)
    for index in range(config.num_hidden_layers):
        for stem in _LAYER_ORDER:
            path = f"model.layers.{index}.{llama.LAYER_TENSORS[stem]}"
            module = model.get_submodule(path)
            name = f"blk.{index}.{stem}.weight"
            if stem.endswith("norm"):
                entries.append(_float_entry(name, module.weight, "f32"))
            else:
                linear(name, module, llama.heads_for(stem, config))
    entries.append(_float_entry("output_norm.weight", model.get_submodule("model.norm").weight, "f32"))
    return entries, kinds


def _file_type(kinds, float_type) -> int:
    if not kinds:
        return FILE_TYPES["F32" if float_type == "f32" else "F16"]
    totals: dict[str, int] = {}
    for kind, count in kinds:
        totals[kind] = totals.get(kind, 0) + count
    return FILE_TYPES[max(totals, key=totals.get)]


def save(model, path: str | os.PathLike, tokenizer=None, float_type: str = "f32", pre: str | None = None,
         name: str | None = None) -> None:  # fmt: skip
    """Write ``model`` (a transformers ``LlamaForCausalLM``-like model) to ``path``; see the module docstring."""
    config = model.config
    if getattr(config, "model_type", None) not in ("llama", "mistral"):
        raise ValueError(f"GGUF export writes llama models; this one is {getattr(config, 'model_type', None)!r}")
    if float_type not in ("f32", "f16"):
        raise ValueError(f"float_type must be 'f32' or 'f16', got {float_type!r}")
    entries, kinds = _tensors(model, config, float_type)
    stored = dict(getattr(model, "gguf_metadata", {}) or {})
    stored.pop("general.alignment", None)
    source = os.path.basename(str(getattr(config, "name_or_path", "") or "").rstrip("/"))
    name = name or stored.get("general.name", (None, None))[1] or source or "model"
    computed = llama.metadata_from_config(config, name)
    computed += [("general.file_type", UINT32, _file_type(kinds, float_type)),
                 ("general.quantization_version", UINT32, 2)]  # fmt: skip
    if tokenizer is not None:
        from qcompile.gguf.tokenizer import to_metadata

        stored_pre = stored.get("tokenizer.ggml.pre", (None, None))[1]
        computed += to_metadata(tokenizer, pre or stored_pre or "default", config.vocab_size)
    elif not any(key.startswith("tokenizer.ggml.") for key in stored):
        computed.append(("tokenizer.ggml.model", STRING, "none"))
    metadata = {key: (_writer_type(types), value) for key, (types, value) in stored.items()}
    for key, type_id, value in computed:
        metadata[key] = (type_id, value)
    write(path, [(key, type_id, value) for key, (type_id, value) in metadata.items()], entries)


def _writer_type(types):
    type_id, item = types
    return (ARRAY, item) if type_id == ARRAY else type_id
