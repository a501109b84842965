"""The decoder of benchmarks/e2e_gpu.py (in benchmarks/llama_decoder.py), on CPU: its KV-cached decode step
against a full causal forward written here independently, and the same step after ``qcompile.quantize``
(int8)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import qcompile
from qcompile.nn import QuantizedLinear

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "e2e_gpu.py"
TOKENS = (5, 17, 999, 3)


def load_script():
    name = "benchmarks_e2e_gpu"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look the module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[name]


e2e = load_script()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Half-rotation RoPE of ``x [1, heads, T, D]`` at positions 0..T-1 (angles in float64)."""
    length, dim = x.shape[-2], x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    half = dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * angles.cos().to(x.dtype) + rotated * angles.sin().to(x.dtype)


def full_forward(model, tokens: list[int]) -> torch.Tensor:
    """Logits ``[T, vocab]`` of a causal forward over ``tokens``: no cache, KV heads repeated, plain matmuls."""
    c = model.config
    length = len(tokens)
    x = model.tok_embeddings.weight[torch.tensor(tokens)][None]
    for layer in model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        h = rms_norm(x, layer.attention_norm.weight, c.norm_eps)
        q, k, v = (h @ attn.wqkv.weight.T).split(
            (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim), dim=-1)  # fmt: skip
        q = rope(q.view(1, length, c.n_heads, c.head_dim).transpose(1, 2), c.rope_theta)
        k = rope(k.view(1, length, c.n_kv_heads, c.head_dim).transpose(1, 2), c.rope_theta)
        v = v.view(1, length, c.n_kv_heads, c.head_dim).transpose(1, 2)
        repeat = c.n_heads // c.n_kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + y.transpose(1, 2).reshape(1, length, -1) @ attn.wo.weight.T
        h = rms_norm(x, layer.ffn_norm.weight, c.norm_eps)
        x = x + (F.silu(h @ ffn.w1.weight.T) * (h @ ffn.w3.weight.T)) @ ffn.w2.weight.T
    return (rms_norm(x, model.norm.weight, c.norm_eps) @ model.lm_head.weight.T)[0]


@torch.no_grad()
def decode(model, tokens) -> list[torch.Tensor]:
    """The step's logits ``[vocab]`` for ``tokens[p]`` at position ``p``, p = 0, 1, ..."""
    out = []
    for p, t in enumerate(tokens):
        token, pos = torch.tensor([[t]]), torch.tensor([p])
        logits = model.step(token, pos)
        assert logits.shape == (1, 1, model.config.vocab)
        out.append(logits[0, 0])
    return out


@pytest.mark.parametrize("attention", ["grouped", "gqa"])
def test_decode_step_matches_full_causal_forward(attention):
    config = e2e.dataclasses.replace(e2e.TINY, attention=attention)
    model = e2e.build_model(config, "cpu", seed=0, dtype=torch.float32)
    steps = decode(model, TOKENS)
    with torch.no_grad():
        for p in range(len(TOKENS)):
            expected = full_forward(model, list(TOKENS[: p + 1]))[-1]
            torch.testing.assert_close(steps[p], expected, atol=1e-4, rtol=0)


def test_int8_step_stays_close_and_lm_head_stays_float():
    model = e2e.build_model(e2e.TINY, "cpu", seed=0, dtype=torch.float32)
    reference = decode(model, TOKENS)
    qcompile.quantize(model, {"default": "int8"}, progress_bar=False)
    assert type(model.lm_head) is torch.nn.Linear
    assert isinstance(model.layers[0].attention.wqkv, QuantizedLinear)
    assert isinstance(model.layers[-1].feed_forward.w2, QuantizedLinear)
    for got, want in zip(decode(model, TOKENS), reference):
        assert (got - want).norm() / want.norm() < 0.05


def test_positions_must_fit_the_cache():
    e2e.check_positions(context=8, steps=4, max_seq=64)
    with pytest.raises(ValueError, match="--max-seq"):
        e2e.check_positions(context=60, steps=4, max_seq=64)


def test_inline_needs_compile(capsys):
    assert e2e.parse_args(["--tiny", "--compile", "--inline"]).inline
    with pytest.raises(SystemExit):
        e2e.parse_args(["--tiny", "--inline"])
    assert "--inline needs --compile" in capsys.readouterr().err
