"""GGUF files (llama.cpp): a hardened reader, import of llama models keeping the file's quantized blocks, export.

    model, tokenizer = qcompile.gguf.load("model.gguf")          # linears keep their ggml blocks
    qcompile.gguf.save(model, "out.gguf", tokenizer)             # a Llama model quantized with gguf schemes

:func:`read` parses and checks a file (:class:`GGUFError` on bad input). The block formats are the ``gguf`` scheme
family (:mod:`qcompile.schemes.gguf`). See ``docs/gguf.md``.
"""

from __future__ import annotations

from qcompile.gguf.reader import GGUFError, GGUFFile, TensorInfo, read

__all__ = ["GGUFError", "GGUFFile", "TensorInfo", "load", "read", "save"]


def load(path, keep_codes=True, tokenizer=True):
    """``(model, tokenizer)``: see :func:`qcompile.gguf.importer.load`."""
    from qcompile.gguf.importer import load as _load

    return _load(path, keep_codes=keep_codes, tokenizer=tokenizer)


def save(model, path, tokenizer=None, **options):
    """Write ``model`` as a GGUF file: see :func:`qcompile.gguf.exporter.save`."""
    from qcompile.gguf.exporter import save as _save

    return _save(model, path, tokenizer=tokenizer, **options)
