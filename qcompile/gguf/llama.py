"""What a llama.cpp ``llama`` GGUF means in transformers terms: tensor names, the config, the Q/K row permutation.

Tensor names (llama.cpp ``LLM_ARCH_LLAMA``): ``token_embd``, ``output_norm``, ``output`` (absent: tied to
``token_embd``), ``blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}``,
each ``.weight`` (and ``.bias`` where the model has one).

Q/K permutation: llama.cpp applies RoPE to adjacent pairs, transformers to the two halves of each head. The converter
(``convert_hf_to_gguf`` ``LlamaModel.permute``) stores ``attn_q`` (``n_head`` heads) and ``attn_k`` (``n_head_kv``)
with, per head of ``hd`` rows, GGUF row ``2i + t`` = transformers row ``t * hd/2 + i`` (``i < hd/2``, ``t`` in 0, 1).
Rows are independent, so permuting whole rows of quantized blocks is exact.
"""

from __future__ import annotations

import re

import torch

ARCH = "llama"
#: GGUF per-layer tensor stem → transformers module path inside ``model.layers.N``
LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL = re.compile(r"^([a-z_]+)\.(weight|bias)$")


def module_path(gguf_name: str) -> tuple[str, str] | None:
    """``("model.layers.3.self_attn.q_proj", "weight")`` for ``"blk.3.attn_q.weight"``; ``None`` if unknown."""
    m = _LAYER.match(gguf_name)
    if m and m[2] in LAYER_TENSORS:
        return f"model.layers.{m[1]}.{LAYER_TENSORS[m[2]]}", m[3]
    m = _GLOBAL.match(gguf_name)
    if m and m[1] in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[m[1]], m[2]
    return None


def gguf_name(module: str, kind: str = "weight") -> str | None:
    """Inverse of :func:`module_path`."""
    for stem, path in GLOBAL_TENSORS.items():
        if module == path:
            return f"{stem}.{kind}"
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", module)
    if m:
        for stem, path in LAYER_TENSORS.items():
            if m[2] == path:
                return f"blk.{m[1]}.{stem}.{kind}"
    return None


def heads_for(gguf_stem: str, config) -> int | None:
    """Heads whose rows are permuted for ``attn_q`` / ``attn_k`` (else ``None``)."""
    if gguf_stem.endswith("attn_q"):
        return config.num_attention_heads
    if gguf_stem.endswith("attn_k"):
        return config.num_key_value_heads
    return None


def unpermute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """GGUF row order → transformers row order, ``rows [R, ...]`` (whole rows: floats or block bytes)."""
    r = rows.shape[0]
    if r % (2 * heads):
        raise ValueError(f"{r} rows do not split into {heads} heads of an even size")
    return rows.reshape(heads, r // heads // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape).contiguous()


def permute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers row order → GGUF row order (``convert_hf_to_gguf`` ``LlamaModel.permute``)."""
    r = rows.shape[0]
    if r % (2 * heads):
        raise ValueError(f"{r} rows do not split into {heads} heads of an even size")
    return rows.reshape(heads, 2, r // heads // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape).contiguous()


def config_from_metadata(metadata: dict, tensor_names, where: str):
    """A transformers ``LlamaConfig`` from GGUF metadata (llama.cpp ``llm_load_hparams`` keys)."""
    from transformers import LlamaConfig

    from qcompile.gguf.reader import GGUFError

    arch = metadata.get("general.architecture")
    if arch != ARCH:
        raise GGUFError(f"{where}: general.architecture is {arch!r}; this loader reads {ARCH!r} models")

    def need(key):
        if f"{ARCH}.{key}" not in metadata:
            raise GGUFError(f"{where}: metadata key {ARCH}.{key} is missing (llama.cpp needs it)")
        return metadata[f"{ARCH}.{key}"]

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = int(metadata.get(f"{ARCH}.attention.head_count_kv", heads))
    head_dim = int(metadata.get(f"{ARCH}.attention.key_length", hidden // heads))
    rope_dim = int(metadata.get(f"{ARCH}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise GGUFError(f"{where}: {ARCH}.rope.dimension_count {rope_dim} != head size {head_dim} (partial RoPE is "
                        f"not a llama model)")  # fmt: skip
    scaling = metadata.get(f"{ARCH}.rope.scaling.type", "none")
    rope = {"rope_type": "default", "rope_theta": float(metadata.get(f"{ARCH}.rope.freq_base", 10000.0))}
    if scaling == "linear":
        rope = {**rope, "rope_type": "linear", "factor": float(metadata[f"{ARCH}.rope.scaling.factor"])}
    elif scaling != "none":
        raise GGUFError(f"{where}: {ARCH}.rope.scaling.type {scaling!r} is not supported (none, linear are)")
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = int(metadata.get(f"{ARCH}.vocab_size", len(tokens) if tokens is not None else 0))
    names = set(tensor_names)
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")), num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(need("context_length")), rope_parameters=rope,
        tie_word_embeddings="output.weight" not in names, attention_bias="blk.0.attn_q.bias" in names,
        mlp_bias="blk.0.ffn_up.bias" in names,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"), use_cache=False,
    )  # fmt: skip


def metadata_from_config(config, name: str | None = None) -> list[tuple[str, int, object]]:
    """``(key, value type id, value)`` for the ``llama.*`` keys llama.cpp reads, from a transformers config."""
    from qcompile.gguf.writer import FLOAT32, STRING, UINT32

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    out = [("general.architecture", STRING, ARCH)]
    if name:
        out.append(("general.name", STRING, name))
    out += [
        (f"{ARCH}.block_count", UINT32, config.num_hidden_layers),
        (f"{ARCH}.context_length", UINT32, config.max_position_embeddings),
        (f"{ARCH}.embedding_length", UINT32, config.hidden_size),
        (f"{ARCH}.feed_forward_length", UINT32, config.intermediate_size),
        (f"{ARCH}.attention.head_count", UINT32, heads),
        (f"{ARCH}.attention.head_count_kv", UINT32, config.num_key_value_heads),
        (f"{ARCH}.rope.freq_base", FLOAT32, float(theta)),
        (f"{ARCH}.attention.layer_norm_rms_epsilon", FLOAT32, float(config.rms_norm_eps)),
        (f"{ARCH}.vocab_size", UINT32, config.vocab_size),
        (f"{ARCH}.rope.dimension_count", UINT32, head_dim),
    ]
    if head_dim != config.hidden_size // heads:
        out += [(f"{ARCH}.attention.key_length", UINT32, head_dim),
                (f"{ARCH}.attention.value_length", UINT32, head_dim)]
    if rope.get("rope_type", "default") == "linear":
        out += [(f"{ARCH}.rope.scaling.type", STRING, "linear"),
                (f"{ARCH}.rope.scaling.factor", FLOAT32, float(rope["factor"]))]  # fmt: skip
    elif rope.get("rope_type", "default") != "default":
        raise ValueError(f"GGUF export: rope_type {rope.get('rope_type')!r} is not supported (default, linear are)")
    return out
