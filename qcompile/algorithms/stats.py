"""What calibration records for one site, accumulated batch by batch from the site's inputs ``x [..., K]``.

| field        | shape       | meaning                                                     | used by           |
|--------------|-------------|-------------------------------------------------------------|-------------------|
| `hessian`    | `[K, K]`    | ``2/n · Σ x xᵀ`` over all ``n`` tokens (float64 running mean) | GPTQ              |
| `abs_mean`   | `[K]`       | mean ``|x_j|`` per input channel                             | AWQ               |
| `abs_max`    | `[K]`       | max ``|x_j|`` per input channel                              | SmoothQuant       |
| `inputs`     | `[S, K]`    | up to ``max_samples`` input rows, spread evenly over batches | AWQ's scale search |
| `scale`      | `[K]`       | per-input-channel factor folded into the weight (AWQ, SmoothQuant) | report |
| `input_divisor` | `[K]`  | explicit input scale: ``W · s`` quantized, ``x / s`` at run time | quantize stage |

Padding: :meth:`SiteStatistics.add` takes the batch's ``attention_mask`` ``[B, S]`` and keeps only the rows of real
tokens when the site's input is ``[B, S, K]`` (its rows map 1:1 to the tokens). Inputs of any other layout (rows
not tokens: a pooled ``[B, K]``, tokens regrouped into ``[T, K]``) are taken whole; ``unmasked`` counts their rows.

``note`` says what the pre-pass did to the site (scaled, or why not). ``result`` holds a quantization
already computed during block-by-block calibration, keyed by scheme, options and a digest of the
weight it was computed from, so it is reused only for that exact weight.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch

from qcompile.schemes import QuantizedWeight, Scheme


def weight_digest(weight: torch.Tensor) -> str:
    """blake2b of the weight's float32 bytes (row-major ``[N, K]``)."""
    data = weight.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclasses.dataclass
class SiteStatistics:
    site: str
    in_features: int
    want_hessian: bool = False
    want_inputs: bool = False
    max_samples: int = 512
    tokens: int = 0
    hessian: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    abs_max: torch.Tensor | None = None
    inputs: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    input_divisor: torch.Tensor | None = None
    unmasked: int = 0
    note: str = ""
    result: tuple[str, QuantizedWeight] | None = None

    @property
    def abs_mean(self) -> torch.Tensor | None:
        return None if self.abs_sum is None else self.abs_sum / max(self.tokens, 1)

    def reset(self) -> None:
        """Forget the accumulated inputs (the weights before this site changed)."""
        self.tokens, self.hessian, self.abs_sum, self.abs_max, self.inputs = 0, None, None, None, None
        self.unmasked = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Accumulate one batch of inputs ``x [..., K]``; ``mask [B, S]`` (non-zero = real token) drops the padding
        rows of an ``x [B, S, K]``."""
        x = x.detach()
        if x.shape[-1] != self.in_features:
            raise ValueError(f"site {self.site}: input is {list(x.shape)}, expected [..., {self.in_features}]")
        if mask is not None:
            if x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.to(device=x.device) != 0]
            else:
                self.unmasked += x.numel() // max(1, x.shape[-1])
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        rows = x.shape[0]
        if rows == 0:
            return
        absx = x.abs()
        if self.abs_sum is None:
            self.abs_sum, self.abs_max = absx.sum(0).double(), absx.amax(0)
        else:
            self.abs_sum += absx.sum(0).double()
            self.abs_max = torch.maximum(self.abs_max, absx.amax(0))
        if self.want_hessian:
            batch = 2.0 * (x.t() @ x).to(torch.float64)  # float32 products, float64 running sum
            total = self.tokens + rows  # running mean of 2·x xᵀ, as the reference code keeps it
            previous = 0 if self.hessian is None else self.hessian * (self.tokens / total)
            self.hessian = previous + batch / total
        if self.want_inputs:
            step = max(1, rows // max(1, self.max_samples // 8))
            kept = x[::step][: self.max_samples]
            self.inputs = kept if self.inputs is None else torch.cat([self.inputs, kept])[-self.max_samples :]
        self.tokens += rows

    def remember(self, scheme: Scheme, weight: torch.Tensor, options: dict, q: QuantizedWeight) -> None:
        self.result = (self._key(scheme, weight, options), q)

    def cached_result(self, scheme: Scheme, weight: torch.Tensor, options: dict) -> QuantizedWeight | None:
        if self.result is None or self.result[0] != self._key(scheme, weight, options):
            return None
        return self.result[1]

    @staticmethod
    def _key(scheme: Scheme, weight: torch.Tensor, options: dict) -> str:
        return f"{scheme.name}|{sorted(dict(options).items())}|{weight_digest(weight)}"
