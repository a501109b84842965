"""What the commands share: exit codes, the usage error, loading a model or a tokenizer from a source name."""

from __future__ import annotations

import os
import sys


OK, FAILED, USAGE, CORRUPT = 0, 1, 2, 3


BUILTIN_MODELS = ("smollm2", "minilm", "tiny-llama")


class UsageError(Exception):
    """Bad arguments or inputs the user can fix; exit code 2."""


def load_model(source: str):
    """``(model, tokenizer or None, task)`` from a built-in name, a local Hugging Face directory or a .gguf file."""
    from qcompile import models

    if source == "smollm2":
        model, tokenizer = models.load_smollm2()
        return model, tokenizer, "causal-lm"
    if source == "minilm":
        model, tokenizer = models.load_minilm()
        return model, tokenizer, "encoder"
    if source == "tiny-llama":
        return models.tiny_llama(), None, "causal-lm"
    import transformers

    if os.path.isfile(source) and source.endswith(".gguf"):
        from qcompile import gguf

        try:  # linears keep the file's quantized blocks
            model, tokenizer = gguf.load(source, keep_codes=True)
            return model, tokenizer, "causal-lm"
        except gguf.GGUFError as error:
            print(f"qcompile: {error}; loading {source} dequantized through transformers instead", file=sys.stderr)
        directory, name = os.path.split(os.path.abspath(source))
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
        model.config.use_cache = False
        return model, tokenizer, "causal-lm"
    if os.path.isdir(source):
        config = transformers.AutoConfig.from_pretrained(source)
        causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
        auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        model = auto.from_pretrained(source).eval()
        if causal:
            model.config.use_cache = False
        return model, tokenizer_at(source), "causal-lm" if causal else "encoder"
    names = ", ".join(BUILTIN_MODELS)
    raise UsageError(f"model {source!r} is not a built-in name ({names}), a directory or a .gguf file")


def tokenizer_at(source: str):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        return None


def example_inputs(model, tokenizer, task: str) -> dict:
    import torch

    texts = ["The quick brown fox jumps over the lazy dog.", "Quantized models load from one file."]
    if tokenizer is not None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        inputs = {"input_ids": batch["input_ids"]}
        if task == "encoder":
            inputs["attention_mask"] = batch["attention_mask"]
        return inputs
    vocab = getattr(model.config, "vocab_size", 128)
    inputs = {"input_ids": torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))}
    if task == "encoder":
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return inputs


def tokenizer_for(program, explicit: str | None):
    """The tokenizer named by ``--tokenizer``, else the one of the model source recorded at export."""
    source = explicit or program.manifest.get("metadata", {}).get("source")
    if source == "smollm2":
        import transformers

        from qcompile import models

        converted = models.cache_dir() / "models" / "smollm2"
        if converted.exists():
            return transformers.AutoTokenizer.from_pretrained(converted)
        gguf = models.smollm2_gguf_path()
        return transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if source == "minilm":
        from qcompile import models

        return tokenizer_at(str(models.minilm_path()))
    if isinstance(source, str) and os.path.isdir(source):
        return tokenizer_at(source)
    return None


def mib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB"


def say(args, result: dict) -> dict:
    if not args.json:
        for key, value in result.items():
            print(f"{key}: {value}")
    return result


def causal_program(args):
    from qcompile.export import load

    program = load(args.file)
    if program.manifest.get("metadata", {}).get("task", "causal-lm") != "causal-lm":
        raise UsageError(f"{args.file} holds an encoder; {args.command} needs a causal language model")
    return program
