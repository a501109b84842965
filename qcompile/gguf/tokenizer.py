"""Tokenizers to and from GGUF metadata (``tokenizer.ggml.*``, llama.cpp ``llama-vocab.cpp``).

From GGUF: the ``tokenizer.ggml.*`` keys go through transformers' own GGUF tokenizer conversion
(``transformers.integrations.gguf``) — the same builder ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` uses,
fed from qcompile's reader so the file is parsed once.

To GGUF (a ``gpt2`` byte-level BPE, as ``convert_hf_to_gguf`` writes it for SmolLM2 and other GPT-2-style
vocabularies): ``tokenizer.ggml.model = "gpt2"``, ``pre`` (pre-tokenizer name llama.cpp knows, e.g. ``smollm``;
``default`` when not given), ``tokens`` by id (``[PADi]`` for ids without a token), ``token_type`` (1 normal, 3 control
= special added token, 4 user-defined = other added token, 5 unused), ``merges`` (``"a b"``), the bos/eos/unknown/
padding ids, ``add_bos_token``, ``add_space_prefix`` (false) and ``chat_template`` when set.
"""

from __future__ import annotations

import json

from qcompile.gguf.writer import ARRAY, BOOL, INT32, STRING, UINT32

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                "pad_token": "padding_token_id"}  # fmt: skip


def from_metadata(metadata: dict, where: str = "GGUF"):
    """A transformers tokenizer built from a file's ``tokenizer.*`` metadata, or ``None`` when it has no vocabulary."""
    if "tokenizer.ggml.tokens" not in metadata:
        return None
    from transformers import TokenizersBackend
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    grouped = {
        group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in metadata}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)
    tokens = tokenizer["tokens"]
    for name, key in _SPECIAL_IDS.items():
        index = metadata.get(f"tokenizer.ggml.{key}")
        config[name] = tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None
    backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer)
    return TokenizersBackend(tokenizer_object=backend, **config, **extra)


def to_metadata(tokenizer, pre: str = "default", vocab_size: int | None = None) -> list[tuple[str, object, object]]:
    """``(key, type, value)`` entries for a byte-level BPE transformers tokenizer; ``ValueError`` for other kinds."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export writes byte-level BPE (gpt2) tokenizers; this one is "
                         f"{model.get('type') or type(tokenizer).__name__}")  # fmt: skip
    vocab = tokenizer.get_vocab()
    size = vocab_size or max(len(tokenizer), max(vocab.values()) + 1)
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
        else:
            tokens.append(token)
            types.append((CONTROL if added[index].special else USER_DEFINED) if index in added else NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    out = [
        ("tokenizer.ggml.model", STRING, "gpt2"),
        ("tokenizer.ggml.pre", STRING, pre),
        ("tokenizer.ggml.tokens", (ARRAY, STRING), tokens),
        ("tokenizer.ggml.token_type", (ARRAY, INT32), types),
        ("tokenizer.ggml.merges", (ARRAY, STRING), merges),
    ]
    for name, key in _SPECIAL_IDS.items():
        index = getattr(tokenizer, f"{name}_id", None)
        if isinstance(index, int):
            out.append((f"tokenizer.ggml.{key}", UINT32, index))
    add_bos = getattr(tokenizer, "add_bos_token", False)
    out.append(("tokenizer.ggml.add_bos_token", BOOL, bool(add_bos) if isinstance(add_bos, bool) else False))
    out.append(("tokenizer.ggml.add_space_prefix", BOOL, False))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        out.append(("tokenizer.chat_template", STRING, template))
    return out
