"""A Llama-3-8B-shaped decoder in plain PyTorch (gpt-fast style), random weights, for decode benchmarks.

Fused ``wqkv``, SwiGLU ``w1``/``w3``/``w2``, RMSNorm, half-rotation RoPE and a static KV cache of ``max_seq``
positions. ``Transformer.step(token, pos)`` takes device tensors and never reads a device value on the host, so a
whole step can be captured in one CUDA graph. Used by ``benchmarks/e2e_gpu.py``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class Config:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 14336
    vocab: int = 128256
    rope_theta: float = 500000.0
    max_seq: int = 1024
    norm_eps: float = 1e-5
    attention: str = "grouped"  # "grouped" (query heads folded per KV head) or "gqa" (SDPA enable_gqa=True)


LLAMA3_8B = Config()
TINY = Config(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, intermediate=512, vocab=1000, max_seq=64)
TINY_CONTEXT, TINY_STEPS = 8, 4


def rope_tables(config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [max_seq, head_dim]`` (float32) for the half-rotation form: angles repeated over both halves."""
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim)
    angles = torch.outer(torch.arange(config.max_seq, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` in float32, back in ``x.dtype``; ``x [..., head_dim]``."""
    xf = x.float()
    first, second = xf.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """One query token ``q [1, H, 1, D]`` over the cache ``k, v [1, KV, S, D]``; query head ``h`` reads KV head
    ``h // (H // KV)`` (``enable_gqa``'s mapping). ``grouped`` folds a KV head's query heads into rows of one
    query, so SDPA needs no GQA support and keeps a fused kernel under a mask."""
    if mode == "gqa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    batch, heads, length, head_dim = q.shape
    grouped = q.reshape(batch, k.shape[1], heads // k.shape[1] * length, head_dim)
    return F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask).reshape(batch, heads, length, head_dim)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.weight.shape[0],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: Config, dtype: torch.dtype):
        super().__init__()
        self.config = config
        q_dim, kv_dim = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.wqkv = nn.Linear(config.dim, q_dim + 2 * kv_dim, bias=False, dtype=dtype)
        self.wo = nn.Linear(q_dim, config.dim, bias=False, dtype=dtype)
        cache_shape = (1, config.n_kv_heads, config.max_seq, config.head_dim)
        self.register_buffer("k_cache", torch.zeros(cache_shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(cache_shape, dtype=dtype), persistent=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
        c = self.config
        q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        q, k, v = self.wqkv(x).split((q_dim, kv_dim, kv_dim), dim=-1)
        q = apply_rope(q.view(1, 1, c.n_heads, c.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(1, 1, c.n_kv_heads, c.head_dim).transpose(1, 2), cos, sin)
        v = v.view(1, 1, c.n_kv_heads, c.head_dim).transpose(1, 2)
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        y = attend(q, self.k_cache, self.v_cache, mask, c.attention)
        return self.wo(y.transpose(1, 2).reshape(1, 1, q_dim))


class FeedForward(nn.Module):
    def __init__(self, config: Config, dtype: torch.dtype):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate, bias=False, dtype=dtype)
        self.w3 = nn.Linear(config.dim, config.intermediate, bias=False, dtype=dtype)
        self.w2 = nn.Linear(config.intermediate, config.dim, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, config: Config, dtype: torch.dtype):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps, dtype)
        self.attention = Attention(config, dtype)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps, dtype)
        self.feed_forward = FeedForward(config, dtype)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
        h = x + self.attention(self.attention_norm(x), pos, cos, sin, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, config: Config, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab, config.dim, dtype=dtype)
        self.layers = nn.ModuleList(Block(config, dtype) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps, dtype)
        self.lm_head = nn.Linear(config.dim, config.vocab, bias=False, dtype=dtype)
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("positions", torch.arange(config.max_seq), persistent=False)

    def step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits ``[1, 1, vocab]`` of ``token [1, 1]`` at position ``pos [1]`` (both long, on the model's device);
        writes this position's keys and values into the cache. No host sync: capturable in a CUDA graph."""
        x = self.tok_embeddings(token)
        cos, sin = self.rope_cos.index_select(0, pos), self.rope_sin.index_select(0, pos)
        mask = (self.positions <= pos).view(1, 1, 1, -1)
        for layer in self.layers:
            x = layer(x, pos, cos, sin, mask)
        return self.lm_head(self.norm(x))

    def forward(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.step(token, pos)


def build_model(config: Config, device: str | torch.device, seed: int = 0,
                dtype: torch.dtype = torch.bfloat16) -> Transformer:  # fmt: skip
    """The model with random weights, built directly on ``device``: matrices ~ N(0, 0.02), norm weights 1."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(config, dtype)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.fill_(1.0)
            else:
                param.normal_(mean=0.0, std=0.02)
    return model.eval().requires_grad_(False)
