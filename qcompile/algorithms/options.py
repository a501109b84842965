"""Option names each algorithm reads from a recipe rule's ``options``, checked so typos fail loudly.

Recipe options are merged (recipe-wide, then the rule's), so a rule may carry options of the
calibration pass as well. :func:`check_options` (each algorithm, on merged options) refuses unknown names;
:func:`check_plan_options` (before calibration starts) also refuses a name that belongs to another algorithm:
a rule's own options must be its algorithm's or the calibration pass's, a recipe-wide option must be read by
some algorithm the plan runs.
"""

from __future__ import annotations

import difflib

CALIBRATION = ("samples", "seq_len", "seed")
PER_ALGORITHM = {
    "gptq": ("damp", "percdamp", "block_size", "act_order", "static_groups"),
    "awq": ("grid", "max_samples", "explicit_scales"),
    "smoothquant": ("alpha", "explicit_scales"),
    "hqq": ("iterations", "lp_norm", "beta", "kappa", "optimize_scale"),
    "autoround": ("iters", "lr", "minmax_lr", "nsamples", "batch_size", "preset"),
    "aqlm": ("iters", "beam", "tolerance", "cg_steps", "damp", "force", "finetune_steps", "finetune_lr"),
    "spqr": ("damp", "percdamp", "block_size", "act_order", "outlier_threshold"),
    "vptq": ("damp", "block_size", "kmeans_iters", "refit_steps", "force"),
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


def _takes(algorithm: str) -> str:
    own = ", ".join(PER_ALGORITHM.get(algorithm, ())) or "no options of its own"
    return f"{algorithm} takes {own} (and the calibration options {', '.join(CALIBRATION)})"


def _check_name(name: str, algorithms: list[str], where: str) -> None:
    if name in CALIBRATION or any(name in PER_ALGORITHM.get(a, ()) for a in algorithms):
        return
    check_options(algorithms[0], {name: None})  # an unknown name: the error names the closest known one
    owners = "/".join(a for a, names in PER_ALGORITHM.items() if name in names)
    raise ValueError(f"{where}: {name} is an option of {owners}; "
                     + "; ".join(_takes(a) for a in algorithms))  # fmt: skip


def check_plan_options(plan) -> None:
    """Every option of ``plan``'s recipe against the algorithms that read it, before anything runs: a rule's own
    options against the rule's algorithm, recipe-wide ones against every algorithm the plan runs."""
    recipe = plan.recipe
    used = sorted({e.algorithm for e in plan.to_quantize()})
    for i, rule in enumerate(recipe.overrides):
        if rule.scheme is not None:
            for name, _ in rule.options:
                _check_name(name, [rule.algorithm or recipe.algorithm], f"recipe.overrides[{i}].options")
    for name, _ in recipe.options:
        _check_name(name, used or [recipe.algorithm], "recipe.options")
