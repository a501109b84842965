"""Manifest sections of a ``.qpt`` file that describe the model: the plan, the inputs, the kernel index.

``plan``: one row per matmul site, in graph order::

    {"site": {name, weight_name, out_features, in_features, kind, transposed, has_bias, tied_to, head,
              weight_dtype, weight_bytes},
     "scheme": "int4-g128" | null, "algorithm": "rtn", "options": {...}, "reason": "default",
     "layout": "canonical" | null,                    # packed layout name (qcompile.schemes, per scheme)
     "tensors": {"<declared name>": "<path>", ...}}   # weights-member names of the scheme's declared tensors

A site's ``tensors`` must name exactly the tensors its scheme declares for its ``[N, K]``
(``Scheme.tensors``; the op takes them in the declared order, whatever the order of the JSON keys), and each must
have the declared shape and dtype.

``inputs``: one row per flat input, ``{"name", "dtype", "shape"}``; a dimension is an int (fixed) or a
symbol name (dynamic; ``symbols`` gives its ``[min, max]``, ``null`` for unbounded).
``kernels``: ``{"configs": [...], "binaries": []}`` — tuned Triton configs (``qpt_kernels.py``); no binaries yet.
"""

from __future__ import annotations

import dataclasses

import torch

from qcompile.plan import Plan, PlanEntry, Site
from qcompile.runtime.qpt_format import ArtifactError, check_dotted_name, check_identifier

LAYOUTS = ("canonical",)
_SITE_TYPES = {field.name: field.type for field in dataclasses.fields(Site)}


def plan_to_json(plan: Plan, buffer_prefix) -> list[dict]:
    rows = []
    for entry in plan.entries:
        site = dataclasses.asdict(entry.site)
        site["tied_to"] = list(site["tied_to"])
        row = {"site": site, "scheme": entry.scheme, "algorithm": entry.algorithm, "options": dict(entry.options),
               "reason": entry.reason, "layout": None, "tensors": {}, "prequantized": entry.prequantized}  # fmt: skip
        if entry.scheme is not None:
            prefix = buffer_prefix(entry.site)
            row["layout"] = "canonical"
            specs = entry.parsed.tensors(entry.site.out_features, entry.site.in_features)
            row["tensors"] = {spec.name: f"{prefix}.{spec.name}" for spec in specs}
        rows.append(row)
    return rows


def _site(data, where: str) -> Site:
    if not isinstance(data, dict) or set(data) != set(_SITE_TYPES):
        raise ArtifactError(f"{where}: site must hold exactly {sorted(_SITE_TYPES)}")
    for key in ("out_features", "in_features", "weight_bytes"):
        if type(data[key]) is not int or data[key] < 0:
            raise ArtifactError(f"{where}: site.{key} must be a non-negative integer")
    for key in ("transposed", "has_bias", "head"):
        if type(data[key]) is not bool:
            raise ArtifactError(f"{where}: site.{key} must be true or false")
    for key in ("name", "weight_name", "kind", "weight_dtype"):
        if not isinstance(data[key], str):
            raise ArtifactError(f"{where}: site.{key} must be a string")
    if not isinstance(data["tied_to"], list) or not all(isinstance(t, str) for t in data["tied_to"]):
        raise ArtifactError(f"{where}: site.tied_to must be a list of names")
    return Site(**{**data, "tied_to": tuple(data["tied_to"])})


def plan_from_json(rows, recipe_data) -> Plan:
    """The :class:`Plan` a manifest describes; the schemes are parsed, nothing is quantized."""
    from qcompile.recipe import RecipeError, load_recipe
    from qcompile.schemes import SchemeError, parse_scheme

    try:
        recipe = load_recipe(recipe_data if isinstance(recipe_data, dict) else {"bad": recipe_data})
    except RecipeError as error:
        raise ArtifactError(f"manifest: recipe: {error}") from None
    if not isinstance(rows, list):
        raise ArtifactError("manifest: 'plan' must be a list")
    entries = []
    for index, row in enumerate(rows):
        where = f"manifest: plan[{index}]"
        if not isinstance(row, dict):
            raise ArtifactError(f"{where}: not an object")
        site = _site(row.get("site"), where)
        where = f"manifest: plan[{index}] ({site.name})"
        scheme = row.get("scheme")
        if scheme is not None:
            try:
                scheme = parse_scheme(scheme).name
            except SchemeError as error:
                raise ArtifactError(f"{where}: {error}") from None
            if row.get("layout") not in LAYOUTS:
                layout = row.get("layout")
                raise ArtifactError(f"{where}: packed layout {layout!r} is not one this qcompile knows {LAYOUTS}")
        options = row.get("options", {})
        if not isinstance(options, dict) or not isinstance(row.get("algorithm", "rtn"), str):
            raise ArtifactError(f"{where}: options must be an object and algorithm a string")
        prequantized = row.get("prequantized", False)
        if type(prequantized) is not bool:
            raise ArtifactError(f"{where}: prequantized must be true or false")
        entries.append(PlanEntry(site, scheme, row.get("algorithm", "rtn"), tuple(sorted(options.items())),
                                 str(row.get("reason", "default")), prequantized))  # fmt: skip
    return Plan(recipe, tuple(entries))


def check_packed_tensors(plan: Plan, rows: list[dict], weights: dict[str, torch.Tensor]) -> None:
    """Every quantized site names exactly the tensors its scheme declares, and each exists in the weights member with
    the declared shape and dtype (``Scheme.check_packed``). Each row's ``tensors`` is put in the declared order
    (the manifest is written with sorted keys), which :func:`check_graph_sites` then relies on."""
    for index, (entry, row) in enumerate(zip(plan.entries, rows)):
        if entry.scheme is None:
            continue
        where = f"manifest: plan[{index}] ({entry.site.name}, {entry.scheme})"
        specs = entry.parsed.tensors(entry.site.out_features, entry.site.in_features)
        declared = [spec.name for spec in specs]
        names = row.get("tensors")
        if not isinstance(names, dict) or sorted(names) != sorted(declared):
            got = list(names) if isinstance(names, dict) else type(names).__name__
            raise ArtifactError(f"{where}: 'tensors' must name exactly {declared}, got {got}")
        names = row["tensors"] = {key: names[key] for key in declared}  # a JSON object has no order: the scheme's
        tensors = []
        for key, name in names.items():
            if check_dotted_name(name, where) not in weights:
                raise ArtifactError(f"{where}: tensor {key} ({name!r}) is not in the weights member")
            tensors.append(weights[name])
        try:
            entry.parsed.check_packed(tensors, entry.site.out_features, entry.site.in_features)
        except ValueError as error:
            raise ArtifactError(f"{where}: packed tensors do not fit the scheme: {error}") from None


def check_graph_sites(gm: torch.fx.GraphModule, plan: Plan, rows: list[dict]) -> None:
    """Every ``qcompile::linear`` node reads the tensors of one planned site, in order, with that site's scheme and
    shape."""
    by_first = {next(iter(row["tensors"].values())): (entry, row) for entry, row in zip(plan.entries, rows)
                if entry.scheme}  # fmt: skip
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.qcompile.linear.default:
            continue
        where = f"graph member: node {node.name}"
        args = list(node.args) + [None] * (6 - len(node.args))
        tensors, scheme, in_features, out_features = args[1], args[3], args[4], args[5]
        first = tensors[0] if isinstance(tensors, (list, tuple)) and tensors else None
        if not isinstance(first, torch.fx.Node) or first.op != "get_attr" or first.target not in by_first:
            raise ArtifactError(f"{where}: its packed tensors are not the tensors of a site in the plan")
        entry, row = by_first[first.target]
        if scheme != entry.scheme:
            raise ArtifactError(f"{where}: scheme {scheme!r}, but the plan gives {entry.site.name} {entry.scheme!r}")
        paths = [getattr(t, "target", None) for t in tensors]
        if paths != list(row["tensors"].values()):
            raise ArtifactError(f"{where}: packed tensors {paths} are not the plan's {list(row['tensors'].values())}")
        if (in_features, out_features) != (entry.site.in_features, entry.site.out_features):
            raise ArtifactError(f"{where}: in/out features {in_features}/{out_features}, but the plan gives "
                                f"{entry.site.name} {entry.site.in_features}/{entry.site.out_features}")  # fmt: skip


def inputs_to_json(gm: torch.fx.GraphModule) -> tuple[list[dict], dict]:
    """``(inputs, symbols)`` from the placeholders' fake values and the export's range constraints."""
    inputs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            inputs.append({"name": node.target, "dtype": None, "shape": None})
            continue
        shape = [int(d) if isinstance(d, int) else str(d) for d in val.shape]
        inputs.append({"name": node.target, "dtype": str(val.dtype).removeprefix("torch."), "shape": shape})
    symbols = {}
    for symbol, ranges in (getattr(gm, "range_constraints", None) or {}).items():
        symbols[str(symbol)] = [_bound(ranges.lower), _bound(ranges.upper)]
    return inputs, symbols


def _bound(value) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None  # unbounded (sympy's int_oo)
    return number if abs(number) < 1 << 62 else None


def check_inputs_json(inputs, symbols) -> None:
    if not isinstance(inputs, list) or not isinstance(symbols, dict):
        raise ArtifactError("manifest: 'inputs' must be a list and 'symbols' an object")
    for index, row in enumerate(inputs):
        where = f"manifest: inputs[{index}]"
        if not isinstance(row, dict) or not isinstance(row.get("name"), str):
            raise ArtifactError(f"{where}: must be an object with a name")
        check_identifier(row["name"], where)
        shape = row.get("shape")
        if shape is not None and (not isinstance(shape, list) or not all(type(d) in (int, str) for d in shape)):
            raise ArtifactError(f"{where}: shape must list integers and symbol names")
    for name, bounds in symbols.items():
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(b is None or type(b) is int for b in bounds)):
            raise ArtifactError(f"manifest: symbols[{name!r}] must be [min, max] (integers or null)")


def check_call(inputs: list[dict], flat: list, symbols: dict) -> None:
    """Raise ``ValueError`` when the flat call arguments do not fit the exported input description."""
    if len(flat) != len(inputs):
        raise ValueError(f"expected {len(inputs)} tensor inputs, got {len(flat)}")
    bound: dict[str, int] = {}
    for row, value in zip(inputs, flat):
        if row["shape"] is None:
            continue
        name = row["name"]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"input {name!r}: expected a tensor, got {type(value).__name__}")
        if str(value.dtype).removeprefix("torch.") != row["dtype"]:
            raise ValueError(f"input {name!r}: dtype {value.dtype}, the program was exported for {row['dtype']}")
        if value.dim() != len(row["shape"]):
            raise ValueError(f"input {name!r}: {value.dim()} dimensions, expected {len(row['shape'])}: {row['shape']}")
        for axis, (want, got) in enumerate(zip(row["shape"], value.shape)):
            if isinstance(want, int):
                if want != got:
                    raise ValueError(f"input {name!r}: dimension {axis} is {got}, the program has it fixed at {want}")
            elif want in symbols or want.isidentifier():
                if bound.setdefault(want, got) != got:
                    raise ValueError(f"input {name!r}: dimension {axis} is {got}, but {want}={bound[want]} elsewhere")
