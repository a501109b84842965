"""The plan: every matmul site of a model paired with a scheme (or kept float). No tensors touched."""

from __future__ import annotations

import dataclasses
from typing import Any

from qcompile.recipe import Recipe, RecipeError, Target, load_recipe
from qcompile.schemes import Scheme, parse_scheme


#: last name components that mark an output head (kept float unless a recipe names it)
HEAD_NAMES = ("lm_head", "embed_out", "output")


@dataclasses.dataclass(frozen=True)
class Site:
    """A matmul whose weight is a parameter or buffer of the model.

    ``name`` is the module path recipes match (``model.layers.0.mlp.down_proj``); ``weight_name`` the
    parameter's path. ``transposed`` marks weights stored ``[K, N]`` (GPT-2 ``Conv1D``, ``x @ W``).
    ``tied_to`` names other, non-matmul users of the same tensor (an embedding); ``head`` marks output
    heads. ``kind`` is the op found (``linear``, ``matmul``, ``addmm``, ``conv1d`` …).
    """

    name: str
    weight_name: str
    out_features: int
    in_features: int
    kind: str = "linear"
    transposed: bool = False
    has_bias: bool = False
    tied_to: tuple[str, ...] = ()
    head: bool = False
    weight_dtype: str = "float32"
    weight_bytes: int = 0


    @classmethod
    def for_weight(cls, name: str, weight_name: str, weight, *, transposed: bool = False, kind: str = "linear",
                   has_bias: bool = False, tied_to: tuple[str, ...] = ()) -> Site:  # fmt: skip
        """A site for a 2-D ``weight`` stored ``[N, K]`` (``[K, N]`` when ``transposed``)."""
        n, k = weight.shape[::-1] if transposed else weight.shape
        return cls(
            name=name, weight_name=weight_name, out_features=int(n), in_features=int(k), kind=kind,
            transposed=transposed, has_bias=has_bias, tied_to=tied_to, head=name.split(".")[-1] in HEAD_NAMES,
            weight_dtype=str(weight.dtype).removeprefix("torch."), weight_bytes=weight.numel() * weight.element_size(),
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class PlanEntry:
    site: Site
    scheme: str | None  # None: kept in its float dtype
    algorithm: str = "rtn"
    options: tuple[tuple[str, Any], ...] = ()
    reason: str = "default"
    #: the model held this layer quantized already (a ``qcompile::linear`` call): its packed tensors are taken
    #: as they are, nothing is quantized again
    prequantized: bool = False
    #: what the calibration pass did to the layer (AWQ / SmoothQuant: the scale folded, kept explicit, or why not)
    calibration: str = ""

    @property
    def parsed(self) -> Scheme | None:
        return None if self.scheme is None else parse_scheme(self.scheme)

    @property
    def bytes_after(self) -> int:
        scheme = self.parsed
        if scheme is None:
            return self.site.weight_bytes
        return scheme.packed_nbytes(self.site.out_features, self.site.in_features)

    @property
    def note(self) -> str:
        notes = [] if self.reason == "default" else [self.reason]
        if self.prequantized:
            return "; ".join(notes)
        scheme = self.parsed
        if scheme is not None:
            k, kp = self.site.in_features, scheme.padded_in_features(self.site.in_features)
            if kp != k:
                notes.append(f"K {k}→{kp} padded")
            if self.algorithm != "rtn":
                notes.append(self.algorithm)
        if self.site.tied_to and scheme is not None:
            notes.append(f"float copy kept for {', '.join(self.site.tied_to)}")
        if self.calibration:
            notes.append(self.calibration)
        return "; ".join(notes)


@dataclasses.dataclass(frozen=True)
class Plan:
    recipe: Recipe
    entries: tuple[PlanEntry, ...]

    def __iter__(self):
        return iter(self.entries)

    def __len__(self):
        return len(self.entries)

    def quantized(self) -> list[PlanEntry]:
        """Entries with a scheme, pre-quantized ones included (their bytes count; :meth:`to_quantize` skips
        them)."""
        return [e for e in self.entries if e.scheme is not None]

    def to_quantize(self) -> list[PlanEntry]:
        """Entries whose float weight is to be quantized now."""
        return [e for e in self.entries if e.scheme is not None and not e.prequantized]

    def entry(self, site_name: str) -> PlanEntry:
        for e in self.entries:
            if e.site.name == site_name:
                return e
        raise KeyError(site_name)

    @property
    def bytes_before(self) -> int:
        return sum(e.site.weight_bytes for e in self.entries)

    @property
    def bytes_after(self) -> int:
        return sum(e.bytes_after for e in self.entries)

    def table(self) -> str:
        from qcompile.report import plan_table

        return plan_table(self)

    def __str__(self) -> str:
        return self.table()


def _check_all_match(targets: tuple[Target, ...], names: list[str], where: str) -> None:
    for target in targets:
        if not any(target.matches(n) for n in names):
            raise RecipeError(
                f"{where}: target {target.pattern!r} matches no matmul site. "
                f"Sites look like {', '.join(names[:3])}{' …' if len(names) > 3 else ''}"
            )


def make_plan(recipe, sites: list[Site], prequantized: list[tuple[Site, str]] = (),
              kept: list[tuple[Site, str]] = ()) -> Plan:  # fmt: skip
    """Resolve ``recipe`` against ``sites``: ignore first, then ordered overrides, then the default.

    ``prequantized``: ``(site, scheme)`` of layers the model holds quantized already. They keep their scheme
    whatever the recipe says (the recipe applies to the float layers only) and the plan says so per layer; a
    recipe target may name them (the same recipe used twice), but one that names nothing at all is an error.
    ``kept``: ``(site, reason)`` of layers that hold weights but are no matmul qcompile quantizes (convolutions,
    embeddings): listed float with the reason, so no layer is left out of the table silently."""
    recipe = load_recipe(recipe)
    names = [s.name for s in sites] + [s.name for s, _ in prequantized] + [s.name for s, _ in kept]
    _check_all_match(recipe.ignore, names, "recipe.ignore")
    for i, rule in enumerate(recipe.overrides):
        _check_all_match(rule.targets, names, f"recipe.overrides[{i}]")
    entries = [_resolve(recipe, site) for site in sites]
    for site, scheme in prequantized:
        wanted = _resolve(recipe, site)
        reason = "pre-quantized"
        if wanted.scheme is not None and wanted.scheme != scheme:
            reason += f" (the recipe's {wanted.scheme} not applied: quantize the float model to change it)"
        entries.append(PlanEntry(site, scheme, reason=reason, prequantized=True))
    entries += [PlanEntry(site, None, reason=reason) for site, reason in kept]
    return Plan(recipe, tuple(entries))


def _resolve(recipe: Recipe, site: Site) -> PlanEntry:
    if any(t.matches(site.name) for t in recipe.ignore):
        return PlanEntry(site, None, reason="ignored")
    for i, rule in enumerate(recipe.overrides):
        if rule.matches(site.name):
            options = tuple(sorted({**dict(recipe.options), **dict(rule.options)}.items()))
            algorithm = rule.algorithm or recipe.algorithm
            if rule.scheme is None:
                return PlanEntry(site, None, reason=f"rule {i}: kept")
            return PlanEntry(site, rule.scheme, algorithm, options, reason=f"rule {i}")
    if (site.head or site.tied_to) and not recipe.default_includes_head:
        return PlanEntry(site, None, reason="head kept" if site.head else "tied kept")
    if recipe.default is None:
        return PlanEntry(site, None, reason="default: keep")
    return PlanEntry(site, recipe.default, recipe.algorithm, recipe.options)
