"""Calibration inputs: what ``calibration=`` may be, turned into a list of token-id batches ``int64 [B, S]``.

* a list/tuple of token-id tensors (each ``[S]`` or ``[B, S]``): used as given, one forward per tensor;
* one token-id tensor ``[S]`` or ``[B, S]``: split into rows;
* a tokenizer (anything with ``encode``): the built-in public-domain calibration text
  (:func:`qcompile.models.calibration_text`, never used for evaluation) tokenized with it;
* ``None``: the same text, tokenized with the model's own tokenizer when one can be found offline
  (``model.tokenizer``, or a local ``tokenizer.json`` next to ``model.config._name_or_path``).

The built-in text is cut into ``samples`` non-overlapping windows of ``seq_len`` tokens (options of
the recipe; 64 × 512 by default, fewer when the text runs out).
"""

from __future__ import annotations

import os

import torch

DEFAULT_SAMPLES = 64
DEFAULT_SEQ_LEN = 512


def _as_batches(value) -> list[torch.Tensor]:
    tensors = list(value) if isinstance(value, (list, tuple)) else [value]
    out = []
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dim() not in (1, 2):
            got = f"{t.dtype}{list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"calibration[{i}] is {got}; calibration takes token-id tensors (int64 [S] or [B, S]), "
                "a tokenizer, or None for the built-in text"
            )
        out.append(t.reshape(1, -1).long() if t.dim() == 1 else t.long())
    if not out:
        raise ValueError("calibration is empty; pass at least one token-id tensor")
    return out


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


def calibration_batches(model, calibration, samples: int = DEFAULT_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN):
    """``list[int64 [B, S]]`` from a ``calibration=`` argument (see the module docstring)."""
    if calibration is None:
        tokenizer = _model_tokenizer(model)
        if tokenizer is None:
            raise ValueError(
                f"calibration=None uses the built-in text, which needs the model's tokenizer, and none was found "
                f"for {type(model).__name__}. Pass calibration=[token id tensors] or calibration=<tokenizer>."
            )
        return _windows(tokenizer, samples, seq_len)
    if hasattr(calibration, "encode") and not isinstance(calibration, (torch.Tensor, str)):
        return _windows(calibration, samples, seq_len)
    return _as_batches(calibration)
