"""AWQ, activation-aware weight quantization (Lin et al., 2023): scale up the input channels that see
large activations before rounding, so their weights lose less precision, and fold the inverse scale
into the op that produces the input (see :mod:`qcompile.algorithms.scaling`).

For a group of linears sharing an input ``x [S, K]`` (calibration rows) the search tries
``s = mean|x|^α`` for ``α = 0, 1/grid, …, (grid-1)/grid`` (``grid`` = 20, AutoAWQ's grid), normalised so
``max(s) · min(s) = 1``, and keeps the ``s`` that minimises ``Σ ‖x Wᵀ − (x / s) Q(W · s)ᵀ‖²`` over the group's
AWQ sites, ``Q`` being each site's own round-to-nearest scheme. ``α = 0`` is ``s = 1`` (plain
round-to-nearest), so the search never does worse than RTN on the calibration rows. The calibration
pass then folds ``s`` into the float model; at quantize time an AWQ site is round-to-nearest on the
already-scaled weight, in the scheme's canonical form.

Options: ``grid`` (20), ``max_samples`` (input rows kept per site for the search, 512), ``explicit_scales``
(false: a site whose scale no op can absorb stays round to nearest; true: it is searched for that site alone and
kept as an explicit input scale, ``stats.input_divisor``: ``W · s`` is quantized here, the layer divides its input
by ``s`` at run time).
"""

from __future__ import annotations

import torch

from qcompile.algorithms import Algorithm, register_algorithm
from qcompile.algorithms.options import check_options
from qcompile.schemes import QuantizedWeight, Scheme


def candidate_scale(abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(m / sqrt(max m · min m))^α`` computed in logs, so uniform ``m`` gives exactly ones."""
    log_m = abs_mean.to(torch.float64).clamp_min(1e-4).log()
    centre = 0.5 * (log_m.max() + log_m.min())
    return torch.exp(alpha * (log_m - centre)).to(torch.float32)


@torch.no_grad()
def search_scale(weights: list[torch.Tensor], schemes: list[Scheme], inputs: torch.Tensor, abs_mean: torch.Tensor,
                 grid: int = 20) -> tuple[torch.Tensor, float, list[float]]:  # fmt: skip
    """``(s [K], α, errors per α)`` for linears ``weights [N_i, K]`` quantized by ``schemes``."""
    x = inputs.to(torch.float32)
    references = [x @ w.t() for w in weights]
    best_scale, best_alpha, best_error, errors = None, 0.0, float("inf"), []
    for step in range(grid):
        alpha = step / grid
        s = candidate_scale(abs_mean, alpha)
        error = 0.0
        for w, scheme, y in zip(weights, schemes, references):
            w_q = scheme.dequantize(scheme.quantize(w * s)) / s
            error += float(((x @ w_q.t() - y) ** 2).sum())
        errors.append(error)
        if error < best_error:
            best_scale, best_alpha, best_error = s, alpha, error
    return best_scale, best_alpha, errors


def _run(scheme: Scheme, weight: torch.Tensor, stats, options: dict) -> QuantizedWeight:
    check_options("awq", options)
    divisor = getattr(stats, "input_divisor", None)
    if divisor is not None:  # an explicit input scale: the layer divides its input by s at run time
        return scheme.quantize(weight * divisor.to(weight.dtype).unsqueeze(0))
    return scheme.quantize(weight)  # the calibration pass already folded the AWQ scale into ``weight``


register_algorithm(Algorithm("awq", _run, needs_calibration=True, wants_inputs=True))
