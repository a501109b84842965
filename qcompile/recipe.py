"""Recipes: which scheme each matmul site gets, chosen by name patterns.

A recipe is plain data — a dict, a YAML/JSON file, or a :class:`Recipe`::

    default: int4-g128            # scheme for every site no rule names (null: keep float)
    algorithm: rtn                # default algorithm (rtn, gptq, awq, hqq, smoothquant)
    ignore: [lm_head]             # sites kept in full precision
    overrides:                    # ordered; the first rule whose targets match a site wins
      - targets: ["re:.*down_proj$"]
        scheme: int8
      - targets: ["model.layers.0.*"]
        scheme: int4-g32
        algorithm: gptq
        options: {damp: 0.01}

Targets are globs on module names (``*.down_proj``; a glob also matches every site below a module it
names, so ``model.layers.0`` covers that whole layer) or regular expressions prefixed ``re:``
(searched anywhere in the name; anchor with ``^``/``$``). Every target must match at least one site.
Output heads (``lm_head``) and weights tied to an embedding stay float unless an override or
``default_includes_head: true`` names them, as transformers does.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
import os
import re
from typing import Any

from qcompile.algorithms import algorithm_names
from qcompile.schemes import SchemeError, parse_scheme

ALGORITHMS = algorithm_names()  # one registry: qcompile/algorithms/__init__.py
KEEP = ("float", "none", "keep")
_RECIPE_KEYS = ("version", "default", "algorithm", "ignore", "overrides", "options", "default_includes_head")
_RULE_KEYS = ("targets", "scheme", "algorithm", "options")


class RecipeError(ValueError):
    """A recipe that cannot be used, with where and why."""


def _did_you_mean(key: str, allowed) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f" Did you mean {close[0]!r}?" if close else f" Allowed keys: {', '.join(allowed)}."


def _check_keys(data: dict, allowed, where: str) -> None:
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be a mapping, got {type(data).__name__}")
    for key in data:
        if key not in allowed:
            raise RecipeError(f"{where}: unknown key {key!r}.{_did_you_mean(str(key), allowed)}")


def _scheme_name(value, where: str) -> str | None:
    if value is None or (isinstance(value, str) and value.lower() in KEEP):
        return None
    try:
        return parse_scheme(value).name
    except SchemeError as error:
        raise RecipeError(f"{where}: {error}") from None


def _algorithm(value, where: str) -> str | None:
    if value is None:
        return None
    if value not in ALGORITHMS:
        raise RecipeError(f"{where}: unknown algorithm {value!r}.{_did_you_mean(str(value), ALGORITHMS)}")
    return value


@dataclasses.dataclass(frozen=True)
class Target:
    """One name pattern: a glob, or a regex when written ``re:<pattern>``."""

    pattern: str

    def __post_init__(self):
        if not isinstance(self.pattern, str) or not self.pattern:
            raise RecipeError(f"a target must be a non-empty string, got {self.pattern!r}")
        if self.pattern.startswith("re:"):
            try:
                re.compile(self.pattern[3:])
            except re.error as error:
                raise RecipeError(f"target {self.pattern!r} is not a valid regular expression: {error}") from None

    def matches(self, name: str) -> bool:
        if self.pattern.startswith("re:"):
            return re.search(self.pattern[3:], name) is not None
        parts = name.split(".")
        prefixes = (".".join(parts[:i]) for i in range(len(parts), 0, -1))
        return any(fnmatch.fnmatchcase(prefix, self.pattern) for prefix in prefixes)


@dataclasses.dataclass(frozen=True)
class Rule:
    """An ordered override: sites matching any of ``targets`` get ``scheme`` (``None``: keep float)."""

    targets: tuple[Target, ...]
    scheme: str | None
    algorithm: str | None = None
    options: tuple[tuple[str, Any], ...] = ()

    def matches(self, name: str) -> bool:
        return any(t.matches(name) for t in self.targets)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe (see module docstring). Build one with :func:`load_recipe`."""

    default: str | None = "int4-g128"
    algorithm: str = "rtn"
    ignore: tuple[Target, ...] = ()
    overrides: tuple[Rule, ...] = ()
    options: tuple[tuple[str, Any], ...] = ()
    default_includes_head: bool = False
    version: int = 1

    def to_dict(self) -> dict:
        """Plain JSON-able form; ``load_recipe(r.to_dict()) == r``."""
        out: dict[str, Any] = {"version": self.version, "default": self.default, "algorithm": self.algorithm}
        if self.ignore:
            out["ignore"] = [t.pattern for t in self.ignore]
        if self.overrides:
            out["overrides"] = []
            for rule in self.overrides:
                entry: dict[str, Any] = {"targets": [t.pattern for t in rule.targets], "scheme": rule.scheme}
                if rule.algorithm:
                    entry["algorithm"] = rule.algorithm
                if rule.options:
                    entry["options"] = dict(rule.options)
                out["overrides"].append(entry)
        if self.options:
            out["options"] = dict(self.options)
        if self.default_includes_head:
            out["default_includes_head"] = True
        return out


def _targets(value, where: str) -> tuple[Target, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise RecipeError(f"{where} must be a non-empty list of patterns")
    out = []
    for i, pattern in enumerate(value):
        try:
            out.append(Target(pattern))
        except RecipeError as error:
            raise RecipeError(f"{where}[{i}]: {error}") from None
    return tuple(out)


def _options(value, where: str) -> tuple[tuple[str, Any], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise RecipeError(f"{where} must be a mapping")
    return tuple(sorted(value.items()))


def recipe_from_dict(data: dict) -> Recipe:
    _check_keys(data, _RECIPE_KEYS, "recipe")
    version = data.get("version", 1)
    if version != 1:
        raise RecipeError(f"recipe version {version} is not supported (this qcompile reads version 1)")
    rules = []
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list):
        raise RecipeError("recipe.overrides must be a list of rules")
    for i, rule in enumerate(overrides):
        where = f"recipe.overrides[{i}]"
        _check_keys(rule, _RULE_KEYS, where)
        if "targets" not in rule or "scheme" not in rule:
            raise RecipeError(f"{where} needs 'targets' and 'scheme' (use scheme: float to keep a layer)")
        rules.append(
            Rule(
                targets=_targets(rule["targets"], f"{where}.targets"),
                scheme=_scheme_name(rule["scheme"], f"{where}.scheme"),
                algorithm=_algorithm(rule.get("algorithm"), f"{where}.algorithm"),
                options=_options(rule.get("options"), f"{where}.options"),
            )
        )
    ignore = data.get("ignore") or []
    return Recipe(
        default=_scheme_name(data.get("default", "int4-g128"), "recipe.default"),
        algorithm=_algorithm(data.get("algorithm", "rtn"), "recipe.algorithm"),
        ignore=_targets(ignore, "recipe.ignore") if ignore else (),
        overrides=tuple(rules),
        options=_options(data.get("options"), "recipe.options"),
        default_includes_head=bool(data.get("default_includes_head", False)),
        version=version,
    )


def _load_text(text: str, where: str) -> dict:
    import yaml

    try:
        data = yaml.safe_load(text)  # JSON is YAML; safe_load constructs no Python objects from tags
    except yaml.YAMLError as error:
        raise RecipeError(f"{where}: not valid YAML/JSON (only plain data, no tags): {error}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe file must hold a mapping at the top")
    return data


def load_recipe(value: Recipe | dict | str | os.PathLike | None) -> Recipe:
    """A :class:`Recipe` from a Recipe, a dict, a path to a YAML/JSON file, a scheme name or YAML text."""
    if value is None:
        return Recipe()
    if isinstance(value, Recipe):
        return value
    if isinstance(value, dict):
        return recipe_from_dict(value)
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if os.path.exists(text):
            with open(text, encoding="utf-8") as f:
                return recipe_from_dict(_load_text(f.read(), text))
        if text.endswith((".yaml", ".yml", ".json")):
            raise RecipeError(f"recipe file {text!r} does not exist")
        if "\n" not in text and ":" not in text:
            return recipe_from_dict({"default": text})  # a bare scheme name: "int8"
        return recipe_from_dict(_load_text(text, "recipe text"))
    raise RecipeError(f"a recipe is a dict, a YAML/JSON path or a Recipe, got {type(value).__name__}")


def recipe_json(recipe: Recipe) -> str:
    return json.dumps(recipe.to_dict(), sort_keys=True)
