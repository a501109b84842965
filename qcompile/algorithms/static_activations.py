"""``static-activations``: calibrate the static per-tensor input scale of schemes that quantize activations with one
(the ``input_scale`` packed tensor of optimum-quanto's ``-a8`` forms).

The calibration pass records, per site, the largest ``|x|`` of every input channel over all calibration tokens
(``SiteStatistics.abs_max``); this algorithm takes its maximum, the absmax of all of the site's inputs, and lets the
scheme turn it into its scale (``scheme.quantize_with_input_absmax(weight, absmax)``: quanto's ``absmax / 127`` in
the model dtype). The weights are round to nearest.

This is quanto's scale for one calibration batch. Over several batches quanto's ``Calibration()`` keeps a running
average instead: the first batch sets ``scale = absmax_1 / 127``, each later one
``scale = 0.9 * scale + 0.1 * absmax_i / 127``, so later batches count less and the result lies at or below the one
here (``tests/peers/test_quanto.py`` shows both against quanto). quanto also calibrates each layer on the
quantized outputs of the layers before it; qcompile's pass feeds a layer the float model's activations (or, block
by block, those of earlier blocks with quantized weights).
"""

from __future__ import annotations

from qcompile.algorithms import Algorithm, register_algorithm
from qcompile.algorithms.options import check_options
from qcompile.schemes import QuantizedWeight, Scheme

NAME = "static-activations"


def _run(scheme: Scheme, weight, stats, options: dict) -> QuantizedWeight:
    check_options(NAME, options)
    quantize = getattr(scheme, "quantize_with_input_absmax", None)
    if quantize is None or not scheme.quantizes_activations:
        raise ValueError(f"{NAME}: {scheme.name} has no static input scale to calibrate")
    if stats is None or stats.abs_max is None:
        raise ValueError(f"{NAME}: site {getattr(stats, 'site', '?')} saw no calibration inputs")
    return quantize(weight, stats.abs_max.max())


register_algorithm(Algorithm(NAME, _run, needs_calibration=True))
