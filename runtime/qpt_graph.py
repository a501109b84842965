"""The graph member of a ``.qpt`` file: a lowered FX graph written as plain JSON, and read back safely.

JSON form (``graph`` member)::

    {"version": 1,
     "orig_args": ["input_ids", ...],            # forward's argument names
     "in_spec": "<pytree treespec JSON>",         # how (args, kwargs) flatten onto the placeholders
     "out_spec": "<pytree treespec JSON>",        # how the flat outputs rebuild (tuple, dict, ModelOutput …)
     "nodes": [{"name": "add_3", "op": "call_function", "target": "aten.add.Tensor",
                "args": [...], "kwargs": {...}}, ...]}

``op`` is ``placeholder`` (target: the argument name), ``get_attr`` (target: a buffer path in the weights
member), ``call_function`` or ``output``. A ``call_function`` target is looked up in an allow-list: the
ops :mod:`~qcompile.runtime.qpt_ops` allows, and the symbolic-size helpers in :data:`PYTHON_FUNCTIONS`;
nothing is imported or evaluated by name. Arguments are JSON values: ``null``, booleans, integers, finite
floats and strings stand for themselves, lists for lists, and single-key objects for the rest —
``{"node": name}``, ``{"tuple": [...]}``, ``{"dtype": "float32"}``, ``{"device": "cpu"}``,
``{"layout": "strided"}``, ``{"memory_format": "contiguous_format"}``, ``{"float": "inf" | "-inf" | "nan"}``.

Reading rebuilds a :class:`torch.fx.GraphModule` (a :class:`~qcompile.runtime.qpt_ops.LoadedGraphModule`, which
names the node when a call fails); FX generates its Python source from node names and targets that this
module has validated (identifiers, allow-listed callables, literal constants).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from qcompile.runtime.qpt_format import ArtifactError, check_dotted_name, check_identifier
from qcompile.runtime.qpt_ops import (
    OP_NAMESPACES, LoadedGraphModule, check_created_size, check_helper_call, check_op, op_name, refusal,
)  # fmt: skip

GRAPH_VERSION = 1
PYTHON_FUNCTIONS = {
    f"_operator.{name}": getattr(operator, name)
    for name in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "eq", "ne", "lt",
                 "le", "gt", "ge", "and_", "or_", "not_")
} | {
    f"torch.{name}": getattr(torch, name)
    for name in ("sym_max", "sym_min", "sym_not", "sym_float", "sym_int", "sym_ite", "sym_sum", "_check",
                 "_check_is_size")
}  # fmt: skip
DROPPED_MODULES = ("_guards_fn",)  # torch.export's input-guard submodule; the loader checks inputs itself
LAYOUTS = {"strided": torch.strided}  # no sparse layouts: their indices are not checked
MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format, "preserve_format": torch.preserve_format,
    "channels_last": torch.channels_last, "channels_last_3d": torch.channels_last_3d,
}  # fmt: skip
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
#: pytree container types a treespec may name besides those transformers registers for its outputs
SPEC_TYPES = (
    "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict", "torch.Size",
    "torch.fx.immutable_collections.immutable_list", "torch.fx.immutable_collections.immutable_dict",
)  # fmt: skip
SPEC_TYPE_PACKAGES = ("transformers.",)  # output classes of these packages may rebuild outputs once registered
SPEC_OUTPUT_MODULE = "transformers.modeling_outputs"  # the one module the loader may import to register them


# -- writing ------------------------------------------------------------------------------------------
def _target_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        reason = refusal(target)  # the reader's rule: a file written here always loads
        if reason is not None:
            raise ValueError(f"op {op_name(target)} cannot be written to a .qpt graph: {reason}")
        return op_name(target)
    for name, fn in PYTHON_FUNCTIONS.items():
        if fn is target:
            return name
    raise ValueError(f"call target {target!r} cannot be written to a .qpt graph (not an allow-listed op)")


def _encode(value):
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, (list, fx.immutable_collections.immutable_list)):
        return [_encode(v) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    raise ValueError(f"argument {value!r} of type {type(value).__name__} cannot be written to a .qpt graph")


def graph_to_json(gm: fx.GraphModule) -> dict:
    """The JSON form of ``gm``'s graph (see module docstring). ``gm`` uses pytree codegen (torch.export)."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None:
        raise ValueError("the graph module has no pytree signature; export it with torch.export first")
    nodes = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in DROPPED_MODULES:
            if node.users:
                raise ValueError(f"node {node.name}: the result of {node.target} is used")
            continue
        where = f"node {node.name}"
        if node.op not in ("placeholder", "get_attr", "call_function", "output"):
            raise ValueError(f"{where}: op {node.op!r} cannot be written to a .qpt graph")
        entry = {"name": node.name, "op": node.op}
        if node.op in ("placeholder", "get_attr"):
            entry["target"] = node.target
        elif node.op == "call_function":
            entry["target"] = _target_name(node.target)
        if node.op == "placeholder" and node.args:
            raise ValueError(f"{where}: placeholders with default values are not supported")
        if node.op in ("call_function", "output"):
            entry["args"] = [_encode(a) for a in node.args]
            entry["kwargs"] = {k: _encode(v) for k, v in node.kwargs.items()}
        nodes.append(entry)
    return {
        "version": GRAPH_VERSION,
        "orig_args": list(info.orig_args),
        "in_spec": pytree.treespec_dumps(info.in_spec),
        "out_spec": pytree.treespec_dumps(info.out_spec),
        "nodes": nodes,
    }


def get_attr_targets(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "get_attr"]


# -- reading ------------------------------------------------------------------------------------------
def _resolve_target(name, where: str):
    if not isinstance(name, str):
        raise ArtifactError(f"{where}: call target {name!r} is not a string")
    if name in PYTHON_FUNCTIONS:
        return PYTHON_FUNCTIONS[name]
    parts = name.split(".")
    if len(parts) != 3 or parts[0] not in OP_NAMESPACES:
        raise ArtifactError(f"{where}: call target {name!r} is not an allow-listed op")
    namespace, op_name, overload = parts
    check_identifier(op_name, where)
    check_identifier(overload, where)
    packet = getattr(getattr(torch.ops, namespace), op_name, None) if hasattr(torch.ops, namespace) else None
    if not isinstance(packet, torch._ops.OpOverloadPacket) or overload not in packet.overloads():
        raise ArtifactError(f"{where}: op {name!r} does not exist in this torch ({torch.__version__})")
    op = getattr(packet, overload)
    check_op(op, where)
    return op


def _decode(value, nodes: dict, where: str, device_map: dict):
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, list):
        return [_decode(v, nodes, where, device_map) for v in value]
    if isinstance(value, dict) and len(value) == 1:
        (tag, payload), = value.items()
        if tag == "node":
            if payload not in nodes:
                raise ArtifactError(f"{where}: refers to node {payload!r}, which is not defined before it")
            return nodes[payload]
        if tag == "tuple" and isinstance(payload, list):
            return tuple(_decode(v, nodes, where, device_map) for v in payload)
        if tag == "float" and payload in ("inf", "-inf", "nan"):
            return float(payload)
        if tag == "dtype" and payload in _DTYPES:
            return _DTYPES[payload]
        if tag == "layout" and payload in LAYOUTS:
            return LAYOUTS[payload]
        if tag == "memory_format" and payload in MEMORY_FORMATS:
            return MEMORY_FORMATS[payload]
        if tag == "device" and isinstance(payload, str):
            try:
                device = torch.device(payload)
            except RuntimeError:
                raise ArtifactError(f"{where}: {payload!r} is not a device") from None
            return device_map.get(device.type, device)
    raise ArtifactError(f"{where}: argument {str(value)[:80]!r} is not a value a .qpt graph may hold")


def _check_spec_types(schema, where: str) -> None:
    """Walk a treespec JSON schema; every container type must be allow-listed (and is looked up, never built
    from its name). Output classes of :data:`SPEC_TYPE_PACKAGES` are registered by importing their module."""
    import importlib

    stack = [schema]
    while stack:
        item = stack.pop()
        if not isinstance(item, dict) or not isinstance(item.get("children_spec", []), list):
            raise ArtifactError(f"{where}: malformed pytree spec")
        name = item.get("type")
        if name is not None:
            if not isinstance(name, str):
                raise ArtifactError(f"{where}: malformed pytree type {name!r}")
            if name not in SPEC_TYPES and not name.startswith(SPEC_TYPE_PACKAGES):
                raise ArtifactError(f"{where}: container type {name!r} is not one a .qpt may use")
            if name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE and name.startswith(SPEC_OUTPUT_MODULE + "."):
                try:  # a fixed module, never one the file names: it registers transformers' output classes
                    importlib.import_module(SPEC_OUTPUT_MODULE)
                except ImportError as error:
                    raise ArtifactError(f"{where}: outputs are {name!r}; install transformers ({error})") from None
            if name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
                raise ArtifactError(f"{where}: container type {name!r} is not registered with torch pytree")
        stack.extend(item.get("children_spec", []))


def _load_spec(text, where: str):
    import json

    if not isinstance(text, str) or len(text) > (1 << 20):
        raise ArtifactError(f"{where}: pytree spec is not a string of reasonable size")
    try:
        protocol, schema = json.loads(text)
    except (ValueError, TypeError, RecursionError):
        raise ArtifactError(f"{where}: pytree spec is not valid JSON [protocol, schema]") from None
    _check_spec_types(schema, where)
    try:
        return pytree.treespec_loads(text)
    except Exception as error:  # noqa: BLE001 - any failure of torch's own parser is a bad file
        raise ArtifactError(f"{where}: pytree spec cannot be read ({type(error).__name__}: {error})") from None


def graph_from_json(data, buffers: dict[str, torch.Tensor], device_map: dict | None = None) -> fx.GraphModule:
    """Rebuild the GraphModule; ``buffers`` maps every ``get_attr`` target to its (validated) tensor.

    ``device_map`` rewrites device constants (``{"cpu": torch.device("cuda:0")}``) for loading elsewhere.
    """
    device_map = device_map or {}
    if not isinstance(data, dict) or data.get("version") != GRAPH_VERSION:
        version = data.get("version") if isinstance(data, dict) else None
        raise ArtifactError(f"graph member: unknown graph version {version!r} (this qcompile reads {GRAPH_VERSION})")
    orig_args = data.get("orig_args")
    if not isinstance(orig_args, list):
        raise ArtifactError("graph member: 'orig_args' must be a list of names")
    for name in orig_args:
        check_identifier(name, "graph member: orig_args")
    in_spec = _load_spec(data.get("in_spec"), "graph member: in_spec")
    out_spec = _load_spec(data.get("out_spec"), "graph member: out_spec")
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise ArtifactError("graph member: 'nodes' must be a non-empty list")
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    root = torch.nn.Module()
    placeholders = 0
    for index, raw in enumerate(raw_nodes):
        where = f"graph member: node {index}"
        if not isinstance(raw, dict):
            raise ArtifactError(f"{where}: not an object")
        name = check_identifier(raw.get("name"), where)
        where = f"graph member: node {index} ({name})"
        if name in nodes:
            raise ArtifactError(f"{where}: the name is used twice")
        op = raw.get("op")
        if op == "placeholder":
            node = graph.create_node("placeholder", check_identifier(raw.get("target"), where), name=name)
            placeholders += 1
        elif op == "get_attr":
            target = check_dotted_name(raw.get("target"), where)
            if target not in buffers:
                raise ArtifactError(f"{where}: reads tensor {target!r}, which the weights member does not hold")
            _attach(root, target, buffers[target], where)
            node = graph.create_node("get_attr", target, name=name)
        elif op in ("call_function", "output"):
            args, kwargs = raw.get("args", []), raw.get("kwargs", {})
            if not isinstance(args, list) or not isinstance(kwargs, dict):
                raise ArtifactError(f"{where}: args must be a list and kwargs an object")
            args = tuple(_decode(a, nodes, where, device_map) for a in args)
            kwargs = {check_identifier(k, where): _decode(v, nodes, where, device_map) for k, v in kwargs.items()}
            if op == "output":
                if len(args) != 1 or kwargs or index != len(raw_nodes) - 1:
                    raise ArtifactError(f"{where}: the output node must come last and hold one value")
                node = graph.output(args[0])
            else:
                target = _resolve_target(raw.get("target"), where)
                if isinstance(target, torch._ops.OpOverload):
                    check_created_size(target, args, kwargs, where)
                else:
                    check_helper_call(raw["target"], args, kwargs, where)
                node = graph.create_node("call_function", target, args, kwargs, name)
        else:
            raise ArtifactError(f"{where}: op {op!r} is not one a .qpt graph may hold")
        nodes[name] = node
    if raw_nodes[-1].get("op") != "output":
        raise ArtifactError("graph member: the last node must be the output")
    if placeholders != in_spec.num_leaves:
        raise ArtifactError(f"graph member: {placeholders} placeholders, but in_spec has {in_spec.num_leaves} inputs")
    graph._codegen = fx.graph._PyTreeCodeGen(fx.graph._PyTreeInfo(orig_args, in_spec, out_spec))
    _drop_metadata_asserts(graph)
    try:
        graph.lint()
        gm = LoadedGraphModule(root, graph)
    except ArtifactError:
        raise
    except Exception as error:  # noqa: BLE001
        raise ArtifactError(f"graph member: the graph is not well formed ({type(error).__name__}: {error})") from None
    return gm


def _drop_metadata_asserts(graph: fx.Graph) -> None:
    """Remove ``_assert_tensor_metadata`` calls: export's checks that an intermediate tensor has the dtype it had
    while tracing. They return nothing, and cost about a sixth of a language model's decode step when run op by
    op; the program's inputs are still checked against the manifest (``check_call``)."""
    target = torch.ops.aten._assert_tensor_metadata.default
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is target and not node.users:
            graph.erase_node(node)


def _attach(root: torch.nn.Module, path: str, tensor: torch.Tensor, where: str) -> None:
    owner = root
    *parents, leaf = path.split(".")
    for part in parents:
        child = owner._modules.get(part)
        if child is None:
            if hasattr(owner, part):
                raise ArtifactError(f"{where}: tensor path {path!r} collides with a module attribute")
            child = torch.nn.Module()
            owner.add_module(part, child)
        owner = child
    if leaf in owner._buffers:
        return
    if hasattr(owner, leaf):
        raise ArtifactError(f"{where}: tensor path {path!r} collides with a module attribute")
    owner.register_buffer(leaf, tensor)
