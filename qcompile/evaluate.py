"""Measurements people ask for: perplexity, decode speed, model bytes."""

from __future__ import annotations

import math
import time

import torch


def _logits(output):
    return output.logits if hasattr(output, "logits") else output


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, seq_len: int = 512) -> float:
    """Perplexity of ``model`` (``model(input_ids=[1, S]) -> logits``) over non-overlapping windows."""
    ids = token_ids.reshape(-1)
    total_nll, total_tokens = 0.0, 0
    for start in range(0, ids.numel() - 1, seq_len):
        window = ids[start : start + seq_len + 1]
        if window.numel() < 2:
            break
        logits = _logits(model(input_ids=window[:-1].unsqueeze(0))).float()
        nll = torch.nn.functional.cross_entropy(logits[0], window[1:], reduction="sum")
        total_nll += float(nll)
        total_tokens += window.numel() - 1
    return math.exp(total_nll / total_tokens)


@torch.no_grad()
def decode_tokens_per_second(model, prompt_ids: torch.Tensor, new_tokens: int = 32, warmup: int = 4) -> float:
    """Greedy decode speed with the KV cache (transformers ``generate``), batch 1, tokens per second."""
    model.generate(prompt_ids, max_new_tokens=warmup, min_new_tokens=warmup, do_sample=False, use_cache=True)
    start = time.perf_counter()
    model.generate(prompt_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True)
    return new_tokens / (time.perf_counter() - start)


def model_bytes(module: torch.nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (tied tensors counted once)."""
    seen, total = set(), 0
    for tensor in [*module.parameters(), *module.buffers()]:
        key = (tensor.data_ptr(), tensor.numel())
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total
