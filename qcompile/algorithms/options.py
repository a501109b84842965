"""Option names each algorithm reads from a recipe rule's ``options``, checked so typos fail loudly.

Recipe options are merged (recipe-wide, then the rule's), so a rule may carry options of the
calibration pass as well; every name below is accepted by every algorithm, unknown names are errors.
"""

from __future__ import annotations

import difflib

CALIBRATION = ("samples", "seq_len", "seed")
PER_ALGORITHM = {
    "gptq": ("damp", "percdamp", "block_size", "act_order", "static_groups"),
    "awq": ("grid", "max_samples"),
    "smoothquant": ("alpha",),
    "hqq": ("iterations", "lp_norm", "beta", "kappa", "optimize_scale"),
    "rtn": (),
}
KNOWN = tuple(sorted({*CALIBRATION, *(name for names in PER_ALGORITHM.values() for name in names)}))


def check_options(algorithm: str, options: dict | None) -> dict:
    """``options`` as a dict; ``ValueError`` naming an unknown option and the closest known one."""
    options = dict(options or {})
    for name in options:
        if name not in KNOWN:
            close = difflib.get_close_matches(name, KNOWN, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"{algorithm}: unknown option {name!r}.{hint} Options of {algorithm}: "
                f"{', '.join(PER_ALGORITHM.get(algorithm, ())) or 'none'}; of calibration: {', '.join(CALIBRATION)}"
            )
    return options
