"""Capture: ``torch.export`` a module (non-strict, dynamic batch/sequence) and find its matmul sites.

A *site* is a matmul whose weight operand is a parameter or buffer (a ``get_attr`` node in the unlifted
graph): ``aten.linear`` (``nn.Linear``, ``F.linear``), ``aten.matmul`` / ``aten.mm`` with a ``[K, N]``
weight or its transpose, and ``aten.addmm`` (transformers' GPT-2 ``Conv1D``). Each site is named by the
module that owns its weight (``model.layers.0.mlp.down_proj``), or by the weight's own path when it is
not a module's ``weight``. A weight used by several matmuls is one site with several nodes; a weight
also used by something else (a tied embedding) records that use in ``Site.tied_to``.
"""

from __future__ import annotations

import dataclasses
import operator
import re
import warnings

import torch
import torch.fx as fx

from qcompile.plan import HEAD_NAMES, Site

aten = torch.ops.aten
# ATen ops (torch.export) and their torch-level spellings (Dynamo graphs)
LINEAR_OPS = (aten.linear.default, torch._C._nn.linear, torch.nn.functional.linear)
MATMUL_OPS = (aten.matmul.default, aten.mm.default, torch.matmul, torch.mm, operator.matmul)
ADDMM_OPS = (aten.addmm.default, torch.addmm)
TRANSPOSE_OPS = (aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default, torch.t)
TRANSPOSE_METHODS = ("t", "transpose", "permute")
LINEAR_MODULE_TYPES = ("Linear", "Conv1D", "NonDynamicallyQuantizableLinear")
_DYNAMO_PREFIX = re.compile(r"^L\['[^']+'\](?:\[\d+\])?\.?")


@dataclasses.dataclass
class SiteUse:
    """One matmul node that uses a site's weight, and how to read it as ``x @ W.T + bias``."""

    node: fx.Node
    activation: fx.Node
    bias: fx.Node | None
    transposed: bool  # weight tensor is stored [K, N]
    reader: fx.Node | None = None  # the node that reads the weight attribute (the matmul or a transpose)


@dataclasses.dataclass
class SiteMatch:
    site: Site
    weight_node: fx.Node
    uses: list[SiteUse]


def _dynamic_auto(value):
    if isinstance(value, torch.Tensor):
        return {i: torch.export.Dim.AUTO for i in range(value.dim())}
    if isinstance(value, (list, tuple)):
        return type(value)(_dynamic_auto(v) for v in value)
    if isinstance(value, dict):
        return {k: _dynamic_auto(v) for k, v in value.items()}
    return None


def capture(model: torch.nn.Module, example_args=(), example_kwargs=None, dynamic_shapes=None):
    """``torch.export`` ``model`` (non-strict). Every tensor dimension is ``Dim.AUTO`` unless
    ``dynamic_shapes`` says otherwise, so batch and sequence stay dynamic where the model allows. A transformers
    model's ``config.use_cache`` is off while it is captured (language models with a KV cache are exported as a
    step program by :func:`qcompile.export`, see :mod:`qcompile.lm`)."""
    example_args = tuple(example_args) if isinstance(example_args, (list, tuple)) else (example_args,)
    example_kwargs = dict(example_kwargs or {})
    automatic = dynamic_shapes is None
    if automatic:
        if example_kwargs:
            dynamic_shapes = {**_dynamic_auto(dict(zip(_arg_names(model, len(example_args)), example_args))),
                              **_dynamic_auto(example_kwargs)}  # fmt: skip
        else:
            dynamic_shapes = _dynamic_auto(example_args)
    config = getattr(model, "config", None)
    cached = bool(getattr(config, "use_cache", False))
    if cached:
        config.use_cache = False  # the plain forward's graph returns logits, not a KV-cache object it cannot hold
    try:
        with torch.no_grad():
            exported = torch.export.export(model, example_args, example_kwargs, dynamic_shapes=dynamic_shapes,
                                           strict=False)  # fmt: skip
    finally:
        if cached:
            config.use_cache = True
    if automatic:
        _say_fixed_sizes(example_args, example_kwargs)
    return exported


def _say_fixed_sizes(example_args, example_kwargs) -> None:
    """Warn, naming the input, when a dimension left to ``Dim.AUTO`` came out fixed because the example had size 1
    there (torch.export specializes 0 and 1): the program then refuses any other size."""
    fixed = []
    named = {f"argument {i}": value for i, value in enumerate(example_args)}
    for name, value in {**named, **example_kwargs}.items():
        if isinstance(value, torch.Tensor):
            fixed += [f"{name}[{axis}]" for axis, size in enumerate(value.shape) if size == 1]
    if fixed:
        warnings.warn(f"qcompile: {', '.join(fixed)} had size 1 in the example, so the program is fixed at 1 there "
                      "(torch.export specializes sizes 0 and 1); give an example with 2 or more to keep it dynamic",
                      stacklevel=4)  # fmt: skip


def _arg_names(model, count):
    import inspect

    params = [p for p in inspect.signature(model.forward).parameters.values() if p.kind != p.VAR_KEYWORD]
    return [p.name for p in params[:count]]


def _module_entry(node: fx.Node) -> tuple[str, str]:
    """``(module path, class name)`` of the innermost module that ran ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    path = _DYNAMO_PREFIX.sub("", str(path))  # Dynamo writes L['self'].model.layers.0…
    path = re.sub(r"\[(\d+)\]", r".\1", path).lstrip(".")
    name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return path, name.rsplit(".", 1)[-1]


def _module_of(node: fx.Node) -> str:
    return _module_entry(node)[0]


def _weight_operand(node: fx.Node, arg) -> tuple[fx.Node | None, bool]:
    """``(get_attr node, read_through_transpose)`` when ``arg`` is a weight (or its 2-D transpose)."""
    if not isinstance(arg, fx.Node):
        return None, False
    if arg.op == "get_attr":
        return arg, False
    is_transpose = (arg.op == "call_function" and arg.target in TRANSPOSE_OPS) or (
        arg.op == "call_method" and arg.target in TRANSPOSE_METHODS
    )
    if is_transpose:
        source = arg.args[0]
        if isinstance(source, fx.Node) and source.op == "get_attr":
            if arg.target in (aten.transpose.int, "transpose") and sorted(int(d) % 2 for d in arg.args[1:3]) != [0, 1]:
                return None, False
            dims = list(arg.args[1:] if len(arg.args) > 2 else arg.args[1]) if len(arg.args) > 1 else []
            if arg.target in (aten.permute.default, "permute") and dims not in ([1, 0], [-1, -2]):
                return None, False
            return source, True
    return None, False


def _site_use(node: fx.Node) -> tuple[fx.Node, SiteUse] | None:
    """Recognise a matmul node whose weight is a graph attribute."""
    if node.op != "call_function":
        return None
    if node.target in LINEAR_OPS:
        weight, flipped = _weight_operand(node, node.args[1])
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if weight is None or flipped or (bias is not None and not isinstance(bias, fx.Node)):
            return None
        return weight, SiteUse(node, node.args[0], bias, transposed=False)
    if node.target in MATMUL_OPS:
        weight, flipped = _weight_operand(node, node.args[1])
        if weight is None:
            return None
        return weight, SiteUse(node, node.args[0], None, transposed=not flipped)
    if node.target in ADDMM_OPS and not node.kwargs:
        weight, flipped = _weight_operand(node, node.args[2])
        bias = node.args[0]
        if weight is None or not isinstance(bias, fx.Node) or bias.op != "get_attr":
            return None
        return weight, SiteUse(node, node.args[1], bias, transposed=not flipped)
    return None


def _site_name(node: fx.Node, weight_target: str) -> str:
    module_name, module_type = _module_entry(node)
    if module_name and weight_target == f"{module_name}.weight":
        return module_name
    # a Linear reading another module's ``weight`` is a tied head (lm_head over embed_tokens.weight)
    if module_name and module_type in LINEAR_MODULE_TYPES and weight_target.endswith(".weight"):
        return module_name
    if weight_target.endswith(".weight"):
        return weight_target[: -len(".weight")]
    return weight_target


def find_sites(gm: fx.GraphModule) -> list[SiteMatch]:
    """All matmul sites of an unlifted graph module (``ExportedProgram.module()``), in graph order."""
    matches: dict[fx.Node, SiteMatch] = {}
    for node in gm.graph.nodes:
        found = _site_use(node)
        if found is None:
            continue
        weight_node, use = found
        use.reader = node if node in weight_node.users else next(
            (u for u in weight_node.users if u in node.all_input_nodes), node
        )
        tensor = _fetch(gm, weight_node.target)
        if tensor is None or tensor.dim() != 2 or not tensor.dtype.is_floating_point:
            continue
        if weight_node not in matches:
            site = Site.for_weight(_site_name(node, weight_node.target), weight_node.target, tensor,
                                   transposed=use.transposed, kind=_op_name(node.target),
                                   has_bias=use.bias is not None)  # fmt: skip
            matches[weight_node] = SiteMatch(site, weight_node, [])
        match = matches[weight_node]
        if use.transposed != match.site.transposed:
            continue  # the same tensor read both ways: leave the second reading in float
        match.uses.append(use)
    _make_names_unique(list(matches.values()))
    for match in matches.values():
        others = [u for u in match.weight_node.users if all(u is not use.reader for use in match.uses)]
        if others:
            tied = tuple(sorted({_module_of(u) or str(u.target) for u in others}))
            match.site = dataclasses.replace(match.site, tied_to=tied)
    return list(matches.values())


def _make_names_unique(matches: list[SiteMatch]) -> None:
    """Two weights must never share a site name (recipes and packed buffers are keyed by it): a clash
    falls back to the weights' own paths, and a clash that remains is an error."""
    by_name: dict[str, list[SiteMatch]] = {}
    for match in matches:
        by_name.setdefault(match.site.name, []).append(match)
    for name, group in by_name.items():
        if len(group) < 2:
            continue
        for match in group:
            own = match.weight_node.target.removesuffix(".weight")
            if own != name:
                match.site = dataclasses.replace(match.site, name=match.weight_node.target)
    names = [m.site.name for m in matches]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        weights = [m.weight_node.target for m in matches if m.site.name in clashes]
        raise ValueError(f"matmul sites {clashes} are read from several weights ({weights}); "
                         "give each weight its own module or parameter name")  # fmt: skip


def _op_name(target) -> str:
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet or target, "__name__", str(target))


def _fetch(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.Tensor) else None


BATCHED_OPS = (aten.bmm.default, aten.baddbmm.default, torch.bmm, torch.baddbmm)


def unsupported_sites(gm: fx.GraphModule, matches: list[SiteMatch]) -> list[str]:
    """Matmuls that read a weight attribute but are not sites (3-D weights, integer weights, a weight read
    in two orientations …): they stay in float. One line each, for the notice callers print."""
    handled = {use.node for m in matches for use in m.uses}
    notes = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node in handled:
            continue
        if node.target not in (*LINEAR_OPS, *MATMUL_OPS, *ADDMM_OPS, *BATCHED_OPS):
            continue
        weights = [w for w, _ in (_weight_operand(node, a) for a in node.args) if w is not None]
        if not weights:
            continue
        tensor = _fetch(gm, weights[0].target)
        shape = list(tensor.shape) if tensor is not None else "?"
        dtype = str(tensor.dtype).replace("torch.", "") if tensor is not None else "?"
        where = _module_of(node) or weights[0].target
        notes.append(f"{where} ({_op_name(node.target)} with weight {weights[0].target} {dtype}{shape})")
    return notes


@dataclasses.dataclass
class PrequantizedMatch:
    """A ``qcompile::linear`` node already in the graph (a model quantized before capture): its site, its scheme
    and the ``get_attr`` paths of its packed tensors, in the scheme's declared order."""

    site: Site
    scheme: str
    node: fx.Node
    tensor_paths: tuple[str, ...]


def find_prequantized(gm: fx.GraphModule) -> list[PrequantizedMatch]:
    """The ``qcompile::linear`` nodes of a captured graph whose packed tensors are attributes of the module
    (``<module>.<tensor>``, what :class:`qcompile.nn.QuantizedLinear` holds). The site is the module path;
    ``weight_bytes`` counts the weight in the activation dtype (what a float layer of that model would hold)."""
    from qcompile.schemes import parse_scheme

    linear = torch.ops.qcompile.linear  # Dynamo graphs call the packet, exported ones the overload
    out, seen = [], {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or (node.target is not linear and node.target is not linear.default):
            continue
        args = list(node.args) + [None] * (6 - len(node.args))
        tensors, bias, scheme, in_features, out_features = args[1], args[2], args[3], args[4], args[5]
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) and t.op == "get_attr"
                                                             for t in tensors):  # fmt: skip
            continue
        paths = tuple(t.target for t in tensors)
        if paths in seen:
            continue  # the same layer called twice: one site
        declared = [spec.name for spec in parse_scheme(scheme).tensors(out_features, in_features)]
        prefixes = {p.rsplit(".", 1)[0] if "." in p else "" for p in paths}
        names = [p.rsplit(".", 1)[-1] for p in paths]
        if len(prefixes) != 1 or names != declared:
            continue  # not laid out as a module's buffers: the graph keeps it, the plan cannot name it
        prefix = prefixes.pop()
        val = node.meta.get("val")
        dtype = val.dtype if isinstance(val, torch.Tensor) and val.dtype.is_floating_point else torch.float32
        site = Site(name=prefix, weight_name=f"{prefix}.weight", out_features=int(out_features),
                    in_features=int(in_features), kind="qcompile.linear", has_bias=bias is not None,
                    head=prefix.split(".")[-1] in HEAD_NAMES, weight_dtype=str(dtype).removeprefix("torch."),
                    weight_bytes=int(out_features) * int(in_features) * dtype.itemsize)  # fmt: skip
        seen[paths] = PrequantizedMatch(site, scheme, node, paths)
        out.append(seen[paths])
    return out


#: graph ops that read a weight but are no matmul site, and why they stay float
KEPT_OPS = {
    "embedding": "kept float: embedding (a table lookup, not a matmul)",
    "conv1d": "kept float: convolution (qcompile quantizes linear and matmul layers)",
    "conv2d": "kept float: convolution (qcompile quantizes linear and matmul layers)",
    "conv3d": "kept float: convolution (qcompile quantizes linear and matmul layers)",
    "convolution": "kept float: convolution (qcompile quantizes linear and matmul layers)",
    "conv_transpose1d": "kept float: convolution (qcompile quantizes linear and matmul layers)",
    "conv_transpose2d": "kept float: convolution (qcompile quantizes linear and matmul layers)",
}


def kept_sites(gm: fx.GraphModule, matches: list[SiteMatch]) -> list[tuple[Site, str]]:
    """``(Site, reason)`` for the embeddings and convolutions of a captured graph whose weight is no matmul site's
    (an embedding tied to the head is the head's site), so the plan lists them as kept float."""
    taken = {m.weight_node for m in matches}
    out, seen = [], set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or _op_name(node.target) not in KEPT_OPS:
            continue
        weight = node.args[0] if _op_name(node.target) == "embedding" else node.args[1]
        if not isinstance(weight, fx.Node) or weight.op != "get_attr" or weight in taken or weight in seen:
            continue
        tensor = _fetch(gm, weight.target)
        if tensor is None or tensor.dim() < 2:
            continue
        seen.add(weight)
        name = _module_of(node) or weight.target.removesuffix(".weight")
        site = Site(name=name, weight_name=weight.target, out_features=int(tensor.shape[0]),
                    in_features=int(tensor[0].numel()), kind=_op_name(node.target),
                    weight_dtype=str(tensor.dtype).removeprefix("torch."),
                    weight_bytes=tensor.numel() * tensor.element_size())  # fmt: skip
        out.append((site, KEPT_OPS[_op_name(node.target)]))
    return out
