"""Shared fixtures: the bundled SmolLM2-135M GGUF (Q4_1 linears, Q8_0 token embedding), loaded once."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_path():
    from qcompile import models

    return models.smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2_codes(smollm2_path):
    """``(model, tokenizer, seconds)``: ``qcompile.gguf.load`` with the file's blocks kept (timed after imports)."""
    import time

    import transformers.models.llama.modeling_llama  # noqa: F401  (imports are not load time)

    import qcompile.gguf

    start = time.perf_counter()
    model, tokenizer = qcompile.gguf.load(smollm2_path, keep_codes=True)
    return model, tokenizer, time.perf_counter() - start
