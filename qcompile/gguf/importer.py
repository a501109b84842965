"""Load a llama GGUF file into a transformers ``LlamaForCausalLM`` whose linears keep the file's quantized blocks.

``load(path, keep_codes=True) -> (model, tokenizer)``:

* the file is read by :mod:`qcompile.gguf.reader` (hardened); the config comes from its ``llama.*`` metadata;
* every linear whose ggml type is a ``gguf`` scheme (``q4_0`` … ``iq4_xs``) becomes
  ``qcompile.nn.QuantizedLinear(K, N, "<type>", PackedWeight({"blocks": <the file's bytes>}))`` — no float copy;
  ``attn_q`` / ``attn_k`` rows are put back in transformers' order by permuting whole rows of blocks (exact);
* F32 / F16 / BF16 tensors (norms, float linears) load as float32;
* the token embedding is a gather, not a matmul: it is dequantized to float32. With no ``output.weight`` the output
  is tied (llama.cpp): ``lm_head`` is a ``QuantizedLinear`` over the same ``token_embd`` blocks when their type is a
  ``gguf`` scheme, so the logits use the file's codes;
* a linear of a ggml type the family lacks (IQ2/IQ3/TQ …) is dequantized by the peer ``gguf.quants`` with one printed
  line naming it — or refused with ``keep_codes="strict"``; ``keep_codes=False`` dequantizes every linear.

The file's metadata (key → ``(type, value)``) is kept as ``model.gguf_metadata`` for :func:`qcompile.gguf.save`.
"""

from __future__ import annotations

import os

import torch

from qcompile.gguf import llama
from qcompile.gguf.reader import FLOAT_DTYPES, GGUFError, GGUFFile, TensorInfo, read
from qcompile.schemes.gguf_blocks import BY_TYPE_ID, dequantize


def _float(file: GGUFFile, info: TensorInfo) -> torch.Tensor:
    """float32 in the row-major shape, dequantizing block types (family types here, any other by the peer)."""
    if info.type_name in FLOAT_DTYPES:
        return file.tensor(info.name).to(torch.float32)
    raw = file.raw(info.name)
    kind = BY_TYPE_ID.get(info.type_id)
    if kind is not None:
        values = dequantize(raw, kind)
    else:
        from gguf import GGMLQuantizationType, quants

        values = torch.from_numpy(quants.dequantize(raw.numpy(), GGMLQuantizationType(info.type_id)).copy())
    return values.reshape(info.torch_shape).to(torch.float32)


def _check_shape(info: TensorInfo, expected: tuple[int, ...], where: str) -> None:
    if tuple(info.torch_shape) != tuple(expected):
        raise GGUFError(f"{where}: tensor {info.name!r} has shape {list(info.torch_shape)} "
                        f"(ggml ne {list(info.shape)}), "
                        f"the config implies {list(expected)}")  # fmt: skip


def _set_module(model: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _linear(file: GGUFFile, info: TensorInfo, config, bias, keep_codes, where: str) -> torch.nn.Module:
    from qcompile.nn import QuantizedLinear
    from qcompile.schemes import PackedWeight

    n, k = info.torch_shape
    heads = llama.heads_for(info.name.rsplit(".", 1)[0], config)
    kind = BY_TYPE_ID.get(info.type_id)
    if kind is not None and keep_codes:
        blocks = file.raw(info.name)
        if heads:
            blocks = llama.unpermute_rows(blocks, heads)
        return QuantizedLinear(k, n, kind.name, PackedWeight({"blocks": blocks}), bias)
    if info.type_name not in FLOAT_DTYPES and keep_codes:
        if keep_codes == "strict":
            raise GGUFError(f"{where}: tensor {info.name!r} is {info.type_name}, a type the gguf scheme family lacks "
                            f"(keep_codes='strict')")  # fmt: skip
        print(f"qcompile.gguf: {info.name} is {info.type_name} (no gguf scheme): loaded dequantized to float32")
    weight = _float(file, info)
    if heads:
        weight = llama.unpermute_rows(weight, heads)
    linear = torch.nn.Linear(k, n, bias=bias is not None)
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = torch.nn.Parameter(bias, requires_grad=False)
    return linear


def load(path: str | os.PathLike, keep_codes: bool | str = True, tokenizer: bool = True):
    """``(model, tokenizer)`` from a llama GGUF file (see the module docstring); ``tokenizer=False`` skips it."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    if keep_codes not in (True, False, "strict"):
        raise ValueError(f"keep_codes must be True, False or 'strict', got {keep_codes!r}")
    file = read(path)
    where = str(file.path)
    config = llama.config_from_metadata(file.metadata, file.tensors, where)
    unknown = [name for name in file.tensors if llama.module_path(name) is None]
    if unknown:
        raise GGUFError(f"{where}: tensors with no place in a llama model: {', '.join(unknown[:5])}"
                        f"{' …' if len(unknown) > 5 else ''}")  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.model.rotary_emb = LlamaRotaryEmbedding(config)
    missing = {f"{path}.{kind}" for path, m in model.named_modules() for kind, _ in m.named_parameters(recurse=False)}
    if config.tie_word_embeddings:
        missing.discard("lm_head.weight")

    params = {llama.module_path(name): info for name, info in file.tensors.items()}
    for (path, kind), info in params.items():
        if kind == "bias" or path == "lm_head":
            continue
        module = model.get_submodule(path)
        if isinstance(module, torch.nn.Linear):
            bias_info = params.get((path, "bias"))
            bias = None
            if bias_info is not None:
                bias = _float(file, bias_info).reshape(-1)
                heads = llama.heads_for(bias_info.name.rsplit(".", 1)[0], config)
                bias = llama.unpermute_rows(bias, heads) if heads else bias
                missing.discard(f"{path}.bias")
            _check_shape(info, tuple(module.weight.shape), where)
            _set_module(model, path, _linear(file, info, config, bias, keep_codes, where))
        else:
            _check_shape(info, tuple(module.weight.shape), where)
            module.weight = torch.nn.Parameter(_float(file, info), requires_grad=False)
        missing.discard(f"{path}.{kind}")

    output = params.get(("lm_head", "weight")) or params.get(("model.embed_tokens", "weight"))
    if output is None:
        raise GGUFError(f"{where}: the file has neither output.weight nor token_embd.weight")
    _check_shape(output, (config.vocab_size, config.hidden_size), where)
    if not config.tie_word_embeddings or (keep_codes and output.type_id in BY_TYPE_ID):
        _set_module(model, "lm_head", _linear(file, output, config, None, keep_codes, where))
    else:  # tied to the float embedding
        model.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        model.lm_head.weight = model.model.embed_tokens.weight
    missing.discard("lm_head.weight")
    if missing:
        raise GGUFError(f"{where}: the file has no tensor for {', '.join(sorted(missing)[:5])}")
    model.eval()
    model.gguf_metadata = {key: (file.value_types[key], value) for key, value in file.metadata.items()}
    model.gguf_tensor_order = list(file.tensors)
    return model, (llama_tokenizer(file) if tokenizer else None)


def llama_tokenizer(file: GGUFFile):
    """The file's tokenizer (transformers), or ``None`` when it has no vocabulary."""
    from qcompile.gguf.tokenizer import from_metadata

    return from_metadata(file.metadata, str(file.path))
