"""Language-model artifacts: a causal LM exported as one *step* program over a KV cache, and generation from it.

The step takes the new tokens and the cache so far and returns the logits and the grown cache::

    step(input_ids [B, T], token_mask [B, T], past_mask [B, P], position_ids [B, T],
         past_keys [L, B, H, P, D], past_values [L, B, H, P, D])
      -> (logits [B, T, V], keys [L, B, H, P + T, D], values [L, B, H, P + T, D])

``L`` layers, ``H`` key/value heads of ``D`` channels; ``B``, ``T`` and ``P`` are dynamic (1 up to the limits
stored with the program). A prompt is one step over a one-slot past that the mask hides (``past_mask`` 0), each
decoded token one step with ``T = 1``, so one program serves prefill and decode, and left-padded batches
(``token_mask`` 0 on pads; positions count real tokens only). The cache grows by concatenation, as
transformers' ``DynamicCache`` does in eager mode.

:func:`sequence_logits` runs a whole sequence through the step (what ``program(input_ids=...)`` does for a
language-model program), :func:`generate` decodes greedily or by sampling (temperature, top-k, top-p).
"""

from __future__ import annotations

import dataclasses

import torch

#: largest batch a language-model program is exported for (the batch is dynamic from 1 to this)
MAX_BATCH = 64


@dataclasses.dataclass(frozen=True)
class LanguageModelInfo:
    """What generation needs to know about a step program (stored in the ``.qpt`` manifest)."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    max_batch: int
    max_length: int  # tokens a sequence may hold (prompt and generated), the model's context length
    eos_token_id: int | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data, where: str = "manifest: language_model") -> LanguageModelInfo:
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) != fields:
            raise ValueError(f"{where}: must hold exactly {sorted(fields)}")
        for key in ("layers", "kv_heads", "head_dim", "max_batch", "max_length"):
            if type(data[key]) is not int or not 1 <= data[key] <= 1 << 20:
                raise ValueError(f"{where}: {key} must be an integer from 1 to 2**20, got {data[key]!r}")
        if data["dtype"] not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"{where}: dtype must be float32, float16 or bfloat16, got {data['dtype']!r}")
        if data["eos_token_id"] is not None and type(data["eos_token_id"]) is not int:
            raise ValueError(f"{where}: eos_token_id must be an integer or null")
        return cls(**data)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def is_causal_lm(model) -> bool:
    """A transformers decoder-only language model (``…ForCausalLM`` with a config that says how many layers)."""
    config = getattr(model, "config", None)
    return (type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")) and hasattr(model, "generate")
            and config is not None and not getattr(config, "is_encoder_decoder", False)
            and getattr(config, "num_hidden_layers", None) is not None)  # fmt: skip


def info_for(model, max_batch: int = MAX_BATCH) -> LanguageModelInfo:
    config = model.config
    heads = config.num_attention_heads
    dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return LanguageModelInfo(
        layers=int(config.num_hidden_layers), kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
        dtype=str(dtype).removeprefix("torch."), max_batch=max_batch,
        max_length=int(getattr(config, "max_position_embeddings", None) or 2048), eos_token_id=eos,
    )  # fmt: skip


class DecodeStep(torch.nn.Module):
    """The model as one step over a KV cache (see the module docstring). The model's children are this module's
    children under their own names, so sites and recipes keep the model's paths (``model.layers.0.mlp…``).
    Called with ``input_ids`` alone (calibration), it is the model's plain forward."""

    def __init__(self, model):
        super().__init__()
        object.__setattr__(self, "lm", model)  # not a child: its children are ours
        for name, child in model.named_children():
            self.add_module(name, child)

    def forward(self, input_ids, token_mask=None, past_mask=None, position_ids=None, past_keys=None,
                past_values=None):  # fmt: skip
        from transformers import DynamicCache

        if past_keys is None:
            return self.lm(input_ids=input_ids, attention_mask=token_mask).logits
        cache = DynamicCache(config=self.lm.config)
        for i, layer in enumerate(cache.layers):  # no torch.tensor() constants: set the layers' tensors directly
            layer.keys, layer.values = past_keys[i], past_values[i]
            layer.device, layer.is_initialized = past_keys.device, True
        mask = torch.cat([past_mask, token_mask], dim=1)
        out = self.lm(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True)
        layers = out.past_key_values.layers
        keys = torch.cat([layer.keys.unsqueeze(0) for layer in layers])
        values = torch.cat([layer.values.unsqueeze(0) for layer in layers])
        return out.logits, keys, values


def empty_past(info: LanguageModelInfo, batch: int, device="cpu") -> dict:
    """A one-slot past the mask hides: the start of every sequence."""
    shape = (info.layers, batch, info.kv_heads, 1, info.head_dim)
    zeros = torch.zeros(shape, dtype=info.torch_dtype, device=device)
    return {"past_mask": torch.zeros(batch, 1, dtype=torch.long, device=device), "past_keys": zeros,
            "past_values": zeros.clone()}  # fmt: skip


def _positions(token_mask: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Positions of real tokens counted from ``start`` ([B]); pads take the position of the token before."""
    counted = start.unsqueeze(1) + token_mask.cumsum(1) - 1
    return counted.clamp_min(0)


def step_example(info: LanguageModelInfo, input_ids: torch.Tensor) -> dict:
    """Inputs to trace the step with: batch, tokens and past of at least 2 each, so none is specialized."""
    ids = input_ids.reshape(-1, input_ids.shape[-1])
    if ids.shape[1] < 2:
        ids = torch.cat([ids, ids], dim=1)
    ids = ids.repeat(2, 1) if ids.shape[0] < 2 else ids
    batch, tokens = ids.shape
    past = 2
    shape = (info.layers, batch, info.kv_heads, past, info.head_dim)
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": ids, "token_mask": torch.ones(batch, tokens, dtype=torch.long),
        "past_mask": torch.ones(batch, past, dtype=torch.long),
        "position_ids": (torch.arange(tokens) + past).expand(batch, tokens).contiguous(),
        "past_keys": torch.randn(shape, generator=generator).to(info.torch_dtype),
        "past_values": torch.randn(shape, generator=generator).to(info.torch_dtype),
    }  # fmt: skip


def step_dynamic_shapes(info: LanguageModelInfo) -> dict:
    dim = torch.export.Dim
    batch = dim("batch", min=1, max=info.max_batch)
    tokens = dim("tokens", min=1, max=info.max_length)
    past = dim("past", min=1, max=info.max_length + 1)
    return {"input_ids": {0: batch, 1: tokens}, "token_mask": {0: batch, 1: tokens}, "past_mask": {0: batch, 1: past},
            "position_ids": {0: batch, 1: tokens}, "past_keys": {1: batch, 3: past},
            "past_values": {1: batch, 3: past}}  # fmt: skip


@dataclasses.dataclass
class CausalLMOutput:
    logits: torch.Tensor

    def __getitem__(self, index):
        return (self.logits,)[index]


def _check_request(info: LanguageModelInfo, input_ids: torch.Tensor, new_tokens: int) -> None:
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32):
        raise ValueError(f"input_ids: expected integer token ids [batch, tokens], got {input_ids.dtype} "
                         f"{list(input_ids.shape)}")  # fmt: skip
    batch, tokens = input_ids.shape
    if batch > info.max_batch:
        raise ValueError(f"input_ids: batch {batch} is larger than the {info.max_batch} this program was exported for")
    if tokens + new_tokens > info.max_length:
        raise ValueError(f"input_ids: {tokens} prompt tokens + {new_tokens} new ones exceed the program's context of "
                         f"{info.max_length} tokens")  # fmt: skip


def sequence_logits(step, info: LanguageModelInfo, input_ids, attention_mask=None) -> CausalLMOutput:
    """Logits of a whole sequence (``[B, T, V]``) through the step program, from an empty cache."""
    _check_request(info, input_ids, 0)
    input_ids = input_ids.long()
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    past = empty_past(info, input_ids.shape[0], input_ids.device)
    positions = _positions(mask, torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device))
    logits, _, _ = step(input_ids=input_ids, token_mask=mask, position_ids=positions, **past)
    return CausalLMOutput(logits)


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
          generator) -> torch.Tensor:  # fmt: skip
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = logits.sort(-1, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(step, info: LanguageModelInfo, input_ids, attention_mask=None, *, max_new_tokens: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """``[B, T + new]`` token ids: the prompt, then up to ``max_new_tokens`` tokens per row. Rows that reach
    ``eos_token_id`` (the program's own by default) keep emitting it until every row has."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    _check_request(info, input_ids, max_new_tokens)
    eos = info.eos_token_id if eos_token_id is None else eos_token_id
    ids = input_ids.long()
    batch = ids.shape[0]
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.long()
    past = empty_past(info, batch, ids.device)
    past_mask, keys, values = past["past_mask"], past["past_keys"], past["past_values"]
    positions = _positions(mask, torch.zeros(batch, dtype=torch.long, device=ids.device))
    tokens, token_mask, out = ids, mask, [ids]
    finished = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        logits, keys, values = step(input_ids=tokens, token_mask=token_mask, past_mask=past_mask,
                                    position_ids=positions, past_keys=keys, past_values=values)  # fmt: skip
        past_mask = torch.cat([past_mask, token_mask], dim=1)
        nxt = _pick(logits[:, -1], do_sample, temperature, top_k, top_p, generator)
        if eos is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos), nxt)
            finished |= nxt == eos
        out.append(nxt.unsqueeze(1))
        positions = positions[:, -1:] + 1
        tokens, token_mask = nxt.unsqueeze(1), torch.ones(batch, 1, dtype=torch.long, device=ids.device)
        if eos is not None and bool(finished.all()):
            break
    return torch.cat(out, dim=1)
