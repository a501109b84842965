"""Calibration inputs: what ``calibration=`` may be, turned into a list of :class:`Batch` (one model call each).

One batch is any of:

* a float tensor: the model's positional input, ``model(x)``;
* an integer tensor ``[S]`` or ``[B, S]``: token ids, ``model(input_ids=ids)`` (``[S]`` becomes ``[1, S]``);
  ``model(ids)`` when the model's ``forward`` takes no ``input_ids``;
* a tuple (or list) of positional inputs, ``model(*args)``;
* a dict of keyword inputs, ``model(**kwargs)``, e.g. ``{"pixel_values": x}`` or a tokenizer's ``BatchEncoding``.
  Its ``attention_mask`` (``[B, S]``, non-zero on real tokens) keeps padding out of every statistic (see
  :meth:`qcompile.algorithms.stats.SiteStatistics.add`).

``calibration=`` is one batch as above, or a list / any iterable of them (a ``torch.utils.data.DataLoader``, read
once), or:

* a tokenizer (anything with ``encode``): the built-in public-domain calibration text
  (:func:`qcompile.models.calibration_text`, never used for evaluation) tokenized with it;
* ``None``: the same text, tokenized with the model's own tokenizer when one can be found offline
  (``model.tokenizer``, or a local ``tokenizer.json`` next to ``model.config._name_or_path``).

The built-in text is cut into ``samples`` non-overlapping windows of ``seq_len`` tokens (options of the recipe;
64 × 512 by default, fewer when the text runs out). A top-level tuple of integer tensors only is refused as
ambiguous (several token-id batches, or ``(input_ids, attention_mask)`` of one call?): pass a list or a dict.
Tensors move to the device of the model's parameters.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import os

import torch

DEFAULT_SAMPLES = 64
DEFAULT_SEQ_LEN = 512
MASK_KEY = "attention_mask"


@dataclasses.dataclass
class Batch:
    """One model call: ``model(*args, **kwargs)``; ``mask``: ``[B, S]`` (non-zero = real token) or ``None``."""

    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    mask: torch.Tensor | None = None

    def __call__(self, model):
        return model(*self.args, **self.kwargs)

    def describe(self) -> str:
        parts = [_describe(a) for a in self.args] + [f"{k}={_describe(v)}" for k, v in self.kwargs.items()]
        return ", ".join(parts) or "no inputs"

    def form(self) -> tuple:
        """What must agree between the batches of one calibration set: the positional inputs' kinds, the keys."""
        return tuple(_kind(a) for a in self.args), tuple(sorted(self.kwargs))


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
    return type(value).__name__


def _kind(value) -> str:
    if isinstance(value, torch.Tensor):
        return "float tensor" if value.dtype.is_floating_point else "integer tensor"
    return type(value).__name__


def _takes_input_ids(model) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True
    return "input_ids" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _is_token_ids(value) -> bool:
    return isinstance(value, torch.Tensor) and not value.dtype.is_floating_point and not value.dtype.is_complex \
        and value.dtype != torch.bool and value.dim() in (1, 2)  # fmt: skip


def _device(model) -> torch.device | None:
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return None


def _to(value, device):
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_to(v, device) for v in value)
    return value


def _batch(model, value, index: int, device) -> Batch:
    """One :class:`Batch` from one element of ``calibration=`` (``index``: its position, for errors)."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point:
            return Batch((_to(value, device),))
        if _is_token_ids(value):
            ids = _to(value.reshape(1, -1) if value.dim() == 1 else value, device).long()
            return Batch((), {"input_ids": ids}) if _takes_input_ids(model) else Batch((ids,))
        return Batch((_to(value, device),))
    if isinstance(value, collections.abc.Mapping):
        kwargs = {str(k): _to(v, device) for k, v in value.items()}
        mask = kwargs.get(MASK_KEY)
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise ValueError(f"calibration[{index}]: {MASK_KEY} is {type(mask).__name__}; pass tensors "
                             "(a tokenizer's return_tensors='pt')")  # fmt: skip
        return Batch((), kwargs, mask)
    if isinstance(value, (tuple, list)):
        if not value:
            raise ValueError(f"calibration[{index}] is an empty {type(value).__name__}")
        return Batch(tuple(_to(v, device) for v in value))
    raise ValueError(
        f"calibration[{index}] is {type(value).__name__}; calibration takes tensors (token ids int64 [S] or [B, S], "
        "or a float input), tuples of positional inputs, dicts of keyword inputs (a tokenizer's BatchEncoding), "
        "an iterable or DataLoader of those, a tokenizer, or None for the built-in text"
    )


def _elements(calibration) -> list:
    """The batches of ``calibration=`` before conversion: one batch, or the items of a list / iterable."""
    if isinstance(calibration, (torch.Tensor, collections.abc.Mapping)):
        return [calibration]
    if isinstance(calibration, tuple):
        if len(calibration) > 1 and all(_is_token_ids(t) for t in calibration):
            raise ValueError(
                "calibration is a tuple of integer tensors: several token-id batches, or the positional inputs "
                "(input_ids, attention_mask) of one call? Pass a list of token-id batches, or a dict "
                "{'input_ids': ..., 'attention_mask': ...}"
            )
        return [calibration]
    if isinstance(calibration, (str, bytes)):
        raise ValueError("calibration is a string; pass a tokenizer (the built-in text) or its encoding of your "
                         "text: tokenizer(text, return_tensors='pt')")  # fmt: skip
    if isinstance(calibration, collections.abc.Iterable):
        return list(calibration)
    return [calibration]


def _model_tokenizer(model):
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if path and os.path.isfile(os.path.join(path, "tokenizer.json")):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    return None


def _windows(tokenizer, samples: int, seq_len: int) -> list[torch.Tensor]:
    from qcompile.models import calibration_text

    ids = torch.tensor(tokenizer.encode(calibration_text()), dtype=torch.long)
    count = min(samples, ids.numel() // seq_len)
    if count == 0:
        return [ids.reshape(1, -1)]
    return [ids[i * seq_len : (i + 1) * seq_len].reshape(1, -1) for i in range(count)]


def _is_tokenizer(value) -> bool:
    return hasattr(value, "encode") and not isinstance(value, (torch.Tensor, str, bytes, collections.abc.Mapping))


def calibration_batches(model, calibration, samples: int = DEFAULT_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN):
    """``list[Batch]`` from a ``calibration=`` argument (see the module docstring)."""
    if calibration is None:
        tokenizer = _model_tokenizer(model)
        if tokenizer is None:
            raise ValueError(
                f"calibration=None uses the built-in text, which needs the model's tokenizer, and none was found "
                f"for {type(model).__name__}. Pass calibration=<tokenizer>, or the model's inputs: token-id "
                "tensors, float tensors, tuples of positional inputs or dicts of keyword inputs (or a DataLoader)"
            )
        calibration = _windows(tokenizer, samples, seq_len)
    elif _is_tokenizer(calibration):
        calibration = _windows(calibration, samples, seq_len)
    device = _device(model)
    batches = [_batch(model, value, i, device) for i, value in enumerate(_elements(calibration))]
    if not batches:
        raise ValueError("calibration is empty; pass at least one batch of model inputs")
    for i, batch in enumerate(batches[1:], 1):
        if batch.form() != batches[0].form():
            raise ValueError(f"calibration[{i}] is ({batch.describe()}), calibration[0] is ({batches[0].describe()}): "
                             "every batch must give the model the same inputs")  # fmt: skip
    return batches
