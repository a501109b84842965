"""Lowering: every planned matmul site becomes a ``torch.ops.qcompile.linear`` call.

A site with an explicit input scale (``input_divisors``: AWQ / SmoothQuant's ``explicit_scales``) first divides
its activation by the buffer ``<site>.input_divisor`` (``[K]``, in the activation's dtype).

The packed tensors are registered as buffers next to where the float weight lived, under the names the scheme
declares (``<site>.qweight``, ``<site>.scales``, … for the integer families); the float weight is deleted once
nothing reads it any more, so a lowered module holds no float copy of a quantized weight (a tied embedding keeps
its own float table). The pass keeps ``meta["val"]``, ends with dead-code elimination, ``lint`` and
``recompile``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from qcompile.passes.capture import SiteMatch
from qcompile.schemes import PackedWeight

QUANTIZED_LINEAR = torch.ops.qcompile.linear.default


def buffer_prefix(site) -> str:
    """The module path holding a site's packed tensors: ``…mlp.up_proj`` → ``…mlp.up_proj.scales``;
    a weight that is not a module's ``weight`` (``attn.w_q``) gets a child module ``attn.w_q_packed``."""
    if site.weight_name == f"{site.name}.weight":
        return site.name
    return f"{site.weight_name}_packed"


def set_buffer(gm: fx.GraphModule, path: str, tensor: torch.Tensor) -> None:
    owner_path, _, attr = path.rpartition(".")
    owner = gm
    for part in owner_path.split(".") if owner_path else []:
        if not isinstance(getattr(owner, part, None), torch.nn.Module):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    if attr in owner._buffers or attr in owner._parameters or hasattr(owner, attr):
        delattr(owner, attr)
    owner.register_buffer(attr, tensor)


def _delete_attr(gm: fx.GraphModule, path: str) -> None:
    owner_path, _, attr = path.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if hasattr(owner, attr):
        delattr(owner, attr)


def _divide(gm: fx.GraphModule, activation: fx.Node, path: str, divisor: torch.Tensor) -> fx.Node:
    """``activation / divisor`` as a node before the current insertion point (the divisor a buffer at ``path``)."""
    val = activation.meta.get("val")
    set_buffer(gm, path, divisor.detach().to(val.dtype if val is not None else torch.float32).clone())
    node = gm.graph.call_function(torch.ops.aten.div.Tensor, (activation, gm.graph.get_attr(path)))
    if val is not None:
        node.meta["val"] = val
    return node


def lower(gm: fx.GraphModule, matches: list[SiteMatch], packed: dict[str, PackedWeight], schemes: dict[str, str],
          input_divisors: dict[str, torch.Tensor] | None = None):  # fmt: skip
    """Rewrite the sites named in ``packed`` (site name → packed tensors, ``schemes``: site → scheme name;
    ``input_divisors``: site → ``[K]`` its input is divided by first).

    Returns the number of matmul nodes rewritten.
    """
    graph = gm.graph
    rewritten = 0
    replaced: dict[fx.Node, fx.Node] = {}  # a rewritten node may feed a later site (a weight used twice in a row)
    for match in matches:
        site = match.site
        if site.name not in packed:
            continue
        prefix = buffer_prefix(site)
        attrs = {}
        for key, tensor in packed[site.name].tensors().items():
            set_buffer(gm, f"{prefix}.{key}", tensor)
            attrs[key] = f"{prefix}.{key}"
        for use in match.uses:
            with graph.inserting_before(use.node):
                nodes = [graph.get_attr(path) for path in attrs.values()]
                activation = replaced.get(use.activation, use.activation)
                if site.name in (input_divisors or {}):
                    activation = _divide(gm, activation, f"{prefix}.input_divisor", input_divisors[site.name])
                bias = replaced.get(use.bias, use.bias)
                args = (activation, nodes, bias, schemes[site.name], site.in_features, site.out_features)
                new = graph.call_function(QUANTIZED_LINEAR, args)
            new.meta.update({k: v for k, v in use.node.meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
            new.meta["qcompile_site"] = site.name
            use.node.replace_all_uses_with(new)
            graph.erase_node(use.node)
            replaced[use.node] = new
            rewritten += 1
    graph.eliminate_dead_code()
    live = {n.target for n in graph.nodes if n.op == "get_attr"}
    for match in matches:
        if match.site.name in packed and match.weight_node.target not in live:
            _delete_attr(gm, match.weight_node.target)
    graph.lint()
    gm.recompile()
    return rewritten
