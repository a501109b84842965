"""SmoothQuant (Xiao et al., 2022) for ``w8a8``: move activation outliers into the weights before
per-token int8 activation quantization.

Per input channel ``j`` of a group of linears sharing an input::

    s_j = max|X_j|^α / max|W_:j|^(1-α)            α = migration strength, option ``alpha`` (0.5)

(``max|W_:j|`` over all the group's weights; ``s`` clamped to ``[1e-5, 1e5]``). The calibration pass
folds ``x / s`` into the producing op and ``W · s`` into the weights (see
:mod:`qcompile.algorithms.scaling`); at quantize time a SmoothQuant site is round-to-nearest of the
smoothed weight (for ``w8a8``: symmetric int8 per output channel). Option ``explicit_scales`` (false): a site whose
scale no op can absorb keeps it as an explicit input scale (``stats.input_divisor``; ``W · s`` quantized here, the
layer divides its input by ``s`` at run time) instead of staying unsmoothed.
"""

from __future__ import annotations

import torch

from qcompile.algorithms import Algorithm, register_algorithm
from qcompile.algorithms.options import check_options
from qcompile.schemes import QuantizedWeight, Scheme


def smoothing_scale(weights: list[torch.Tensor], abs_max: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """``s [K]`` for linears ``weights [N_i, K]`` whose input has per-channel ``max|X_j|`` = ``abs_max``."""
    w_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0).to(torch.float64).clamp_min(1e-5)
    x_max = abs_max.to(torch.float64).clamp_min(1e-5)
    return (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(1e-5, 1e5).to(torch.float32)


def _run(scheme: Scheme, weight: torch.Tensor, stats, options: dict) -> QuantizedWeight:
    check_options("smoothquant", options)
    divisor = getattr(stats, "input_divisor", None)
    if divisor is not None:  # an explicit input scale: the layer divides its input by s at run time
        return scheme.quantize(weight * divisor.to(weight.dtype).unsqueeze(0))
    return scheme.quantize(weight)  # the calibration pass already folded the smoothing scale into ``weight``


register_algorithm(Algorithm("smoothquant", _run, needs_calibration=True))
