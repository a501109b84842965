"""Pass: every ``qcompile::linear`` call becomes the export-only op of its ONNX form.

Works on a copy of a lowered graph module (:class:`qcompile.QuantizedProgram` ``.module``). For each site the
scheme family's translation (:mod:`qcompile.onnx.families`) turns the packed tensors into ONNX-layout
tensors, registered as buffers ``<module>.onnx_<name>`` next to the old ones (which are then deleted, so the
exported file carries only the ONNX layout). Keeps ``meta["val"]``; ends with DCE, ``lint`` and ``recompile``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from qcompile.onnx import ops  # noqa: F401  (registers torch.ops.qcompile_onnx.*)
from qcompile.onnx.base import ExportOptions, Lowering
from qcompile.onnx.families import lower_site
from qcompile.schemes import PackedWeight, parse_scheme

QUANTIZED_LINEAR = torch.ops.qcompile.linear.default


@dataclasses.dataclass
class PreparedSite:
    """One quantized weight in ONNX form; ``paths``: tensor name → buffer path (= ONNX initializer name)."""

    site: str
    scheme: str
    lowering: Lowering
    paths: dict[str, str]


def _owner_and_attr(gm: fx.GraphModule, path: str):
    owner_path, _, attr = path.rpartition(".")
    return (gm.get_submodule(owner_path) if owner_path else gm), owner_path, attr


def _fetch(gm: fx.GraphModule, node: fx.Node | None) -> torch.Tensor | None:
    if node is None:
        return None
    owner, _, attr = _owner_and_attr(gm, node.target)
    return getattr(owner, attr)


def prepare_for_onnx(gm: fx.GraphModule, options: ExportOptions) -> list[PreparedSite]:
    """Rewrite ``gm`` in place; returns one :class:`PreparedSite` per quantized weight."""
    graph = gm.graph
    lowered: dict[str, PreparedSite] = {}
    old_paths = set()
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not QUANTIZED_LINEAR:
            continue
        x, tensor_nodes, bias, scheme_name, in_features, out_features = node.args
        first = tensor_nodes[0]
        owner, owner_path, _ = _owner_and_attr(gm, first.target)
        site = node.meta.get("qcompile_site", owner_path)
        if first.target not in lowered:
            scheme = parse_scheme(scheme_name)
            tensors = [_fetch(gm, n) for n in tensor_nodes]
            packed = PackedWeight.from_list(scheme, tensors, int(out_features), int(in_features))
            lowering = lower_site(site, scheme, packed, int(in_features), options)
            paths = {}
            for key, tensor in lowering.tensors.items():
                if tensor is not None:
                    owner.register_buffer(f"onnx_{key}", tensor)
                    paths[key] = f"{owner_path}.onnx_{key}" if owner_path else f"onnx_{key}"
            lowered[first.target] = PreparedSite(site, scheme_name, lowering, paths)
        lowering, paths = lowered[first.target].lowering, lowered[first.target].paths
        old_paths.update(n.target for n in tensor_nodes)
        with graph.inserting_before(node):
            inputs = [graph.get_attr(paths[key]) if key in paths else None for key in lowering.tensors]
            new = graph.call_function(lowering.op, (x, *inputs, bias, *lowering.attrs))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
        new.meta["qcompile_site"] = site
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    live = {n.target for n in graph.nodes if n.op == "get_attr"}
    for path in old_paths - live:
        owner, _, attr = _owner_and_attr(gm, path)
        delattr(owner, attr)
    graph.lint()
    gm.recompile()
    return list(lowered.values())
