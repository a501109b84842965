"""``QCompileConfig``: the ``quantization_config`` of ``quant_method="qcompile"`` (what config.json stores)."""

from __future__ import annotations

import copy
import difflib

from transformers.utils.quantization_config import QuantizationConfigMixin

from qcompile.recipe import Recipe, RecipeError, load_recipe
from qcompile.schemes import SchemeError, parse_scheme

METHOD = "qcompile"
FORMAT_VERSION = 1
_SAVED_KEYS = ("quant_method", "format_version", "recipe", "plan")
_PLAN_KEYS = ("scheme", "in_features", "out_features")


def _recipe_data(recipe) -> str | dict:
    """A bare scheme name stays a string (``"int4-g128"``); anything else becomes the recipe's plain dict, so the
    saved config needs no file next to it."""
    if isinstance(recipe, str) and "\n" not in recipe and ":" not in recipe and not recipe.endswith(
            (".yaml", ".yml", ".json")):  # fmt: skip
        try:
            return parse_scheme(recipe).name
        except SchemeError:
            pass  # a path, or a typo: load_recipe says which
    if recipe is None:
        recipe = Recipe()
    return load_recipe(recipe).to_dict()


def _plan_data(plan) -> dict[str, dict] | None:
    """Check a saved plan: ``{site: {"scheme", "in_features", "out_features"}}``."""
    if plan is None:
        return None
    if not isinstance(plan, dict):
        raise ValueError(f"QCompileConfig.plan must map site names to {{scheme, in_features, out_features}}, "
                         f"got {type(plan).__name__}")  # fmt: skip
    out = {}
    for site, entry in plan.items():
        where = f"QCompileConfig.plan[{site!r}]"
        if not isinstance(entry, dict) or sorted(entry) != sorted(_PLAN_KEYS):
            got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise ValueError(f"{where} must have exactly the keys {', '.join(_PLAN_KEYS)}, got {got}")
        try:
            scheme = parse_scheme(entry["scheme"]).name
        except SchemeError as error:
            raise ValueError(f"{where}.scheme: {error}") from None
        for key in ("in_features", "out_features"):
            value = entry[key]
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{where}.{key} must be a positive integer, got {value!r}")
        out[site] = {"scheme": scheme, "in_features": entry["in_features"], "out_features": entry["out_features"]}
    return out


class QCompileConfig(QuantizationConfigMixin):
    """Quantize a transformers model with qcompile while ``from_pretrained`` loads it, or load one saved so.

    ``recipe``: a scheme name (``"int4-g128"``), a recipe dict, a :class:`qcompile.Recipe`, or a YAML/JSON path or
    text (stored as its dict); see :mod:`qcompile.recipe`. Without ``calibration`` every weight is quantized by
    round-to-nearest as it is read, so peak memory is the quantized model plus one float weight.

    ``calibration``: data for the algorithms that need it (``gptq``, ``awq``, ``smoothquant``), as
    :func:`qcompile.quantize` takes it. Those algorithms cannot run weight by weight during loading: the model
    then loads in float and is quantized afterwards, so peak memory is the float model's (the streaming
    command line, ``qcompile quantize``, is the answer for models that do not fit). Never saved.

    ``plan``: written by qcompile once the model is quantized, ``{site: {"scheme", "in_features",
    "out_features"}}``; loading a saved checkpoint builds exactly these modules, without planning again.
    """

    def __init__(self, recipe=None, calibration=None, plan=None, quant_method: str = METHOD,
                 format_version: int = FORMAT_VERSION, **kwargs):  # fmt: skip
        if kwargs:
            key = next(iter(kwargs))
            close = difflib.get_close_matches(key, (*_SAVED_KEYS, "calibration"), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"QCompileConfig got an unknown option {key!r}.{hint} Options: recipe, calibration "
                            f"(and, in saved configs, {', '.join(_SAVED_KEYS)})")  # fmt: skip
        if quant_method != METHOD:
            raise ValueError(f"QCompileConfig.quant_method is {METHOD!r}, got {quant_method!r}")
        if format_version != FORMAT_VERSION:
            raise ValueError(f"QCompileConfig format_version {format_version!r} is not supported (this qcompile "
                             f"reads version {FORMAT_VERSION}); upgrade qcompile")  # fmt: skip
        self.quant_method = METHOD
        self.format_version = FORMAT_VERSION
        try:
            self.recipe = _recipe_data(recipe)
        except RecipeError as error:
            raise ValueError(f"QCompileConfig.recipe: {error}") from None
        self.plan = _plan_data(plan)
        self.calibration = calibration

    def get_recipe(self) -> Recipe:
        return load_recipe(self.recipe)

    def to_dict(self) -> dict:
        """What config.json stores (``calibration`` is not saved)."""
        return {"quant_method": self.quant_method, "format_version": self.format_version,
                "recipe": copy.deepcopy(self.recipe), "plan": copy.deepcopy(self.plan)}  # fmt: skip

    def __eq__(self, other) -> bool:
        return isinstance(other, QCompileConfig) and self.to_dict() == other.to_dict()

    __hash__ = None


def register_config() -> None:
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config

    existing = AUTO_QUANTIZATION_CONFIG_MAPPING.get(METHOD)
    if existing is QCompileConfig:
        return
    if existing is not None and existing.__module__ == __name__:
        del AUTO_QUANTIZATION_CONFIG_MAPPING[METHOD]  # this module, reloaded: replace its earlier class
    register_quantization_config(METHOD)(QCompileConfig)
