"""A lean decode step for Llama-family causal LMs: the model's own weights (float or quantized), no transformers code
per token.

transformers' modules spend more time in Python than a small quantized model spends in its kernels: a SmolLM2-135M
decode step issues about two thousand small ops (masks, cache bookkeeping, module calls). :class:`Decoder` runs the
same arithmetic with about 25 ops a layer: RMSNorm by ``F.rms_norm``, the query/key/value projections fused into one
linear and gate/up into another (when their packed tensors can be stacked by output rows), rotary embeddings from a
table of ``cos``/``sin`` that the model's own rotary module computes once (so every rope scaling it knows applies), a
static key/value cache written in place, and ``F.scaled_dot_product_attention`` over the filled part. On CPU,
RMSNorm with the residual add before it, the rotary embedding, SwiGLU and (up to :data:`FUSED_ATTENTION_MAX`
positions) a decode position's cache write and attention are one C++ call each (``qcompile_cpu::add_rms_norm``,
``rope_``, ``silu_mul``, ``decode_attention`` of ``codegen/cpp/op/decoder_ops.cpp``; torch's own ``F.rms_norm``
runs about twenty ops on CPU) where the op library
loads and the model is float32 or bfloat16; elsewhere, and under ``torch.compile``, the same math in torch ops.

Shapes: ``step(input_ids [B, T], start)`` writes positions ``start .. start+T-1`` of the cache and returns the logits
of the last position ``[B, V]``; ``B`` up to ``max_batch``, ``start + T`` up to ``max_length``. Rows of a batch share
positions (no padding masks: batches of equal-length prompts). :meth:`generate` is greedy.

Supported: ``LlamaForCausalLM`` and the models built like it (``model_type`` in :data:`SUPPORTED`: Llama, SmolLM2,
Mistral without a sliding window shorter than ``max_length``, Qwen2 with its projection biases); anything else is
refused naming what does not fit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qcompile.nn import QuantizedLinear
from qcompile.schemes import PackedWeight

SUPPORTED = ("llama", "mistral", "qwen2")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
#: decode positions up to this many take ``qcompile_cpu::decode_attention`` (one call, one thread per head group
#: below a few thousand multiply-adds) instead of the cache writes and SDPA: SmolLM2's heads, one call, float32,
#: 5 against 23 us at 16 positions, 16 against 28 at 128, but 55 against 45 at 512, where SDPA's threads win
FUSED_ATTENTION_MAX = 256


class DecoderError(ValueError):
    """The model is not one :class:`Decoder` can run; the message names the part that does not fit."""


def _stacked(parts: list[nn.Module]) -> nn.Module | None:
    """One linear computing ``parts`` side by side (outputs concatenated), or ``None`` when they cannot be stacked:
    float linears of one dtype, or quantized ones of one scheme whose every packed tensor leads with the output rows
    (checked: the stacked linear must give the parts' outputs on a probe input)."""
    if all(type(p) is nn.Linear for p in parts):
        if len({(p.in_features, p.weight.dtype, p.bias is None) for p in parts}) != 1:
            return None
        out = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=parts[0].bias is not None)
        out = out.to(parts[0].weight.dtype)
        with torch.no_grad():
            out.weight.copy_(torch.cat([p.weight for p in parts]))
            if out.bias is not None:
                out.bias.copy_(torch.cat([p.bias for p in parts]))
        return out.requires_grad_(False)
    if not all(type(p) is QuantizedLinear for p in parts):
        return None
    if len({(p.scheme, p.in_features, p.tensor_names, p.bias is None) for p in parts}) != 1:
        return None
    tensors = {}
    for name in parts[0].tensor_names:
        pieces = [getattr(p, name) for p in parts]
        if any(t.dim() == 0 or t.shape[0] != p.out_features for t, p in zip(pieces, parts)):
            return None
        if len({t.shape[1:] for t in pieces}) != 1 or len({t.dtype for t in pieces}) != 1:
            return None
        tensors[name] = torch.cat(pieces)
    n = sum(p.out_features for p in parts)
    bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
    try:
        out = QuantizedLinear(parts[0].in_features, n, parts[0].scheme, PackedWeight(tensors), bias)
    except (ValueError, TypeError):
        return None
    probe = torch.randn(2, out.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole, each = out(probe), torch.cat([p(probe) for p in parts], dim=-1)
    return out if torch.allclose(whole, each, rtol=1e-4, atol=1e-5 * float(each.abs().max())) else None


class _Split(nn.Module):
    """``parts`` called one by one, outputs concatenated (where they cannot be stacked into one linear)."""

    def __init__(self, parts):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x):
        return torch.cat([p(x) for p in self.parts], dim=-1)


def _joined(parts: list[nn.Module]) -> nn.Module:
    return _stacked(parts) or _Split(parts)


def _check(model) -> None:
    config = model.config
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        raise DecoderError(f"Decoder: model_type {kind!r} is not supported (supported: {', '.join(SUPPORTED)})")
    if getattr(config, "pretraining_tp", 1) != 1:
        raise DecoderError(f"Decoder: pretraining_tp={config.pretraining_tp} (only 1)")
    if not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise DecoderError(f"Decoder: {type(model).__name__} has no .model.layers")
    for i, layer in enumerate(model.model.layers):
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        for owner, names, where in ((attention, _ATTENTION, "self_attn"), (mlp, _MLP, "mlp")):
            if owner is None:
                raise DecoderError(f"Decoder: layer {i} has no {where}")
            children = {name for name, _ in owner.named_children()}
            extra = children - set(names) - {"act_fn", "rotary_emb"}
            if extra or not set(names) <= children:
                raise DecoderError(f"Decoder: layers.{i}.{where} has {sorted(children)}; expected {list(names)}")
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise DecoderError(f"Decoder: hidden_act {act!r} (only silu)")


class _Layer(nn.Module):
    def __init__(self, layer):
        super().__init__()
        a, m = layer.self_attn, layer.mlp
        self.norm1 = nn.Parameter(layer.input_layernorm.weight.detach(), requires_grad=False)
        self.norm2 = nn.Parameter(layer.post_attention_layernorm.weight.detach(), requires_grad=False)
        self.qkv, self.out = _joined([a.q_proj, a.k_proj, a.v_proj]), a.o_proj
        self.gate_up, self.down = _joined([m.gate_proj, m.up_proj]), m.down_proj


class Decoder(nn.Module):
    """See the module docstring. ``model``: a transformers causal LM of a :data:`SUPPORTED` type, float or with
    :class:`qcompile.nn.QuantizedLinear` layers (``qcompile.quantize``, ``qcompile.gguf.load``, checkpoints).
    The decoder shares the model's weights (stacked projections are new tensors)."""

    def __init__(self, model, max_length: int = 2048, max_batch: int = 1):
        super().__init__()
        _check(model)
        config = model.config
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True) and window < max_length:
            raise DecoderError(f"Decoder: sliding_window {window} is shorter than max_length {max_length}")
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden = config.hidden_size
        self.eps = config.rms_norm_eps
        self.max_length, self.max_batch = max_length, max_batch
        inner = model.model
        self.embed = inner.embed_tokens
        self.dtype = self.embed.weight.dtype
        self.norm = nn.Parameter(inner.norm.weight.detach(), requires_grad=False)
        self.head = model.lm_head
        self.layers = nn.ModuleList(_Layer(layer) for layer in inner.layers)
        positions = torch.arange(max_length)[None]
        with torch.no_grad():
            probe = torch.zeros(1, max_length, self.head_dim, dtype=self.dtype)
            cos, sin = inner.rotary_emb(probe, positions)
        self.register_buffer("cos", cos[0].to(self.dtype), persistent=False)  # [max_length, D]
        self.register_buffer("sin", sin[0].to(self.dtype), persistent=False)
        shape = (len(self.layers), max_batch, self.kv_heads, max_length, self.head_dim)
        self.register_buffer("keys", torch.zeros(shape, dtype=self.dtype), persistent=False)
        self.register_buffer("values", torch.zeros(shape, dtype=self.dtype), persistent=False)
        self.fused = sum(not isinstance(layer.qkv, _Split) for layer in self.layers)
        self.cpu_ops = self.embed.weight.device.type == "cpu" and self.dtype in (torch.float32, torch.bfloat16)
        if self.cpu_ops:
            from qcompile.codegen.cpp import op

            self.cpu_ops = op.load()

    def _fast(self) -> bool:
        return self.cpu_ops and not torch.compiler.is_compiling()

    def _norm(self, x, weight):
        if self._fast():
            return torch.ops.qcompile_cpu.rms_norm(x.contiguous(), weight, self.eps)
        return F.rms_norm(x, (self.hidden,), weight, self.eps)

    def _add_norm(self, x, delta, weight):
        """The residual add and the next RMSNorm: ``(x + delta, norm(x + delta))``."""
        if self._fast():
            return torch.ops.qcompile_cpu.add_rms_norm(x.contiguous(), delta.contiguous(), weight, self.eps)
        x = x + delta
        return x, F.rms_norm(x, (self.hidden,), weight, self.eps)

    def _swiglu(self, gate_up):
        if self._fast():
            return torch.ops.qcompile_cpu.silu_mul(gate_up.contiguous())
        g, u = gate_up.chunk(2, dim=-1)
        return F.silu(g) * u

    def _rope(self, x, cos, sin):
        half = self.head_dim // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def step(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        """Positions ``start .. start+T-1`` of ``input_ids [B, T]`` through the model (the cache holds the earlier
        ones); the logits of the last position, ``[B, V]``. (``decoder(input_ids, start)`` is the same call, and
        ``torch.compile(decoder)`` compiles it.)"""
        return self(input_ids, start)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        batch, count = input_ids.shape
        end = start + count
        if batch > self.max_batch or end > self.max_length or start < 0:
            raise ValueError(f"Decoder.step: batch {batch} (max {self.max_batch}), positions {start}..{end - 1} "
                             f"(max_length {self.max_length})")  # fmt: skip
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        x = self.embed(input_ids)
        cos, sin = self.cos[start:end], self.sin[start:end]
        mask = None
        if count > 1:
            mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
        fast = self._fast()
        fused = fast and count == 1 and end <= FUSED_ATTENTION_MAX  # cache write and attention in one call
        normed = self._norm(x, self.layers[0].norm1)
        for i, layer in enumerate(self.layers):
            y = layer.qkv(normed)
            if fast:
                torch.ops.qcompile_cpu.rope_(y, cos, sin, h + kv)  # the query and key heads, in place
            keys, values = self.keys[i, :batch], self.values[i, :batch]
            if fused:
                a = torch.ops.qcompile_cpu.decode_attention(y.contiguous(), keys, values, start, h, kv, d**-0.5)
            else:
                q, k, v = y.split((h * d, kv * d, kv * d), dim=-1)
                q, k = q.view(batch, count, h, d).transpose(1, 2), k.view(batch, count, kv, d).transpose(1, 2)
                if not fast:
                    q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
                keys[:, :, start:end] = k
                values[:, :, start:end] = v.view(batch, count, kv, d).transpose(1, 2)
                a = F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], attn_mask=mask,
                                                   enable_gqa=h != kv)  # fmt: skip
                a = a.transpose(1, 2).reshape(batch, count, h * d)
            x, normed = self._add_norm(x, layer.out(a), layer.norm2)
            x, normed = self._add_norm(x, layer.down(self._swiglu(layer.gate_up(normed))),
                                       self.layers[i + 1].norm1 if i + 1 < len(self.layers) else self.norm)
        return self.head(normed[:, -1])

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy continuation of ``input_ids [B, T]``: ``[B, T + new]`` (stops early when every row has produced
        ``eos_token_id``)."""
        tokens = input_ids
        logits = self.step(input_ids, 0)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        for made in range(1, max_new_tokens + 1):
            token = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, token], dim=1)
            if eos_token_id is not None:
                done |= token[:, 0] == eos_token_id
                if bool(done.all()):
                    break
            if made == max_new_tokens or tokens.shape[1] >= self.max_length:
                break
            logits = self.step(token, tokens.shape[1] - 1)
        return tokens
