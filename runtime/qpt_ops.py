"""What a graph read from a ``.qpt`` file may call, how large a tensor it may build from constants in the file,
and how a failure while running it is reported.

Allowed: the Core ATen opset (every ``aten`` overload tagged ``torch.Tag.core``), the non-core ``aten`` ops
the supported model families export (:data:`EXTRA_ATEN_OPS`, named one by one), and every public op of the
``qcompile`` namespace. Refused even when core-tagged: ops whose name marks them as skipping checks or
handing out raw memory (:data:`REFUSED_NAME_PARTS`), ops that draw random numbers, and ops that mutate or
take a storage or a free-form string. The writer applies the same rule, so a file it writes always loads.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.fx as fx

from qcompile.runtime.qpt_format import ArtifactError

OP_NAMESPACES = ("aten", "qcompile")
#: non-core ``aten`` ops that tiny and real Llama, GPT-2 and BERT (MiniLM) models export, float32/16 and
#: bfloat16, with the default (SDPA) attention or the eager one
EXTRA_ATEN_OPS = (
    "aten.__and__.Tensor", "aten._assert_scalar.default", "aten._assert_tensor_metadata.default",
    "aten.arange.default", "aten.contiguous.default", "aten.diff.default", "aten.dropout.default",
    "aten.layer_norm.default", "aten.linear.default", "aten.matmul.default", "aten.new_ones.default",
    "aten.reshape.default", "aten.scaled_dot_product_attention.default", "aten.silu.default",
    "aten.softmax.int", "aten.split.Tensor", "aten.to.device", "aten.to.dtype", "aten.to.dtype_layout",
    "aten.transpose.int", "aten.where.ScalarOther", "aten.zeros.default",
)  # fmt: skip
#: parts of an op name that refuse it whatever its tags, with the reason
REFUSED_NAME_PARTS = {
    "unsafe": "it skips its argument checks",
    "sparse": "it builds sparse tensors, whose indices are not checked",
    "empty": "it returns uninitialized memory",
    "as_strided": "it addresses memory by raw sizes and strides",
}
#: string arguments that only pick a mode of a pure op; any other string (a file name …) is refused
SAFE_STRING_ARGUMENTS = frozenset({
    "rounding_mode", "approximate", "reduce", "norm", "side", "padding_side", "indexing", "pad_mode", "mode",
    "UPLO", "driver", "activation", "padding", "assert_msg", "equation", "scheme",
})  # fmt: skip

MAX_CREATED_ELEMENTS = 2**31  # elements a tensor built from size constants in the file may have
#: op → the argument that gives sizes, as a list of dimensions ("shape") or of (before, after) pairs ("pads");
#: ops the allow-list refuses today are listed too, so that allowing one later keeps it bounded
SIZE_ARGUMENTS = {
    "full": ("shape", "size"), "zeros": ("shape", "size"), "ones": ("shape", "size"),
    "new_full": ("shape", "size"), "new_zeros": ("shape", "size"), "new_ones": ("shape", "size"),
    "expand": ("shape", "size"), "repeat": ("shape", "repeats"), "col2im": ("shape", "output_size"),
    "_adaptive_avg_pool2d": ("shape", "output_size"), "_adaptive_avg_pool3d": ("shape", "output_size"),
    "upsample_bilinear2d": ("shape", "output_size"), "upsample_nearest2d": ("shape", "output_size"),
    "embedding_dense_backward": ("shape", "num_weights"), "_fft_c2r": ("shape", "last_dim_size"),
    "constant_pad_nd": ("pads", "pad"), "reflection_pad1d": ("pads", "padding"),
    "reflection_pad2d": ("pads", "padding"), "reflection_pad3d": ("pads", "padding"),
    "replication_pad2d": ("pads", "padding"), "replication_pad3d": ("pads", "padding"),
}  # fmt: skip


class ArtifactRuntimeError(ArtifactError):
    """A node of a graph loaded from a ``.qpt`` file failed while running; the message names the node, its
    target and the original error (also kept as ``__cause__``). The inputs or the file may be at fault."""


def op_name(op: torch._ops.OpOverload) -> str:
    """The name a ``.qpt`` graph gives ``op``: ``<namespace>.<op>.<overload>``."""
    return f"{op.namespace}.{op._opname}.{op._overloadname}"


# -- which ops ----------------------------------------------------------------------------------------
def refusal(op: torch._ops.OpOverload) -> str | None:
    """Why a ``.qpt`` graph may not call ``op``, or ``None`` when it may (see module docstring)."""
    if op.namespace not in OP_NAMESPACES:
        return f"namespace {op.namespace!r} is not one of {', '.join(OP_NAMESPACES)}"
    impurity = _impurity(op)
    if impurity is not None:
        return impurity
    if op.namespace == "qcompile":
        return "it is private to qcompile" if op._opname.startswith("_") else None
    for part, reason in REFUSED_NAME_PARTS.items():
        if part in op._opname:
            return reason
    if op_name(op) in EXTRA_ATEN_OPS:
        return None
    if torch.Tag.core not in op.tags:
        return "it is neither in the Core ATen opset nor among the ops the supported model families export"
    if torch.Tag.nondeterministic_seeded in op.tags:
        return "it draws random numbers"
    return None


def _impurity(op: torch._ops.OpOverload) -> str | None:
    """Why ``op`` is not pure: it mutates its inputs or takes a free-form string or a storage (``aten.from_file``,
    ``aten.fill_``, ``*.out`` overloads …). A graph from a file may only compute, never touch the world."""
    if op._schema.is_mutable:
        return "it mutates its inputs"
    for argument in op._schema.arguments:
        kind = str(argument.type)
        if "Storage" in kind or ("str" in kind and argument.name not in SAFE_STRING_ARGUMENTS):
            return f"it takes {kind} {argument.name!r}"
    return None


def check_op(op: torch._ops.OpOverload, where: str) -> None:
    """Raise :class:`ArtifactError` naming ``where`` unless a ``.qpt`` graph may call ``op`` (:func:`refusal`)."""
    reason = refusal(op)
    if reason is not None:
        raise ArtifactError(f"{where}: op {op_name(op)!r} may not be called by a .qpt graph: {reason}")


def check_helper_call(name: str, args: tuple, kwargs: dict, where: str) -> None:
    """A symbolic-size helper (``_operator.mul`` …) must be given at least one node: export folds constant
    arithmetic, and a helper on constants alone would hand a size past :func:`check_created_size`."""
    stack = [*args, *kwargs.values()]
    while stack:
        value = stack.pop()
        if isinstance(value, fx.Node):
            return
        if isinstance(value, (list, tuple)):
            stack.extend(value)
    raise ArtifactError(f"{where}: {name} is given only constants; a .qpt graph computes with sizes of its inputs")


# -- how large ----------------------------------------------------------------------------------------
def _argument(op: torch._ops.OpOverload, args: tuple, kwargs: dict, name: str):
    """The value ``op`` gets for its argument ``name`` (its default if not passed; ``None`` if it has none)."""
    for index, argument in enumerate(op._schema.arguments):
        if argument.name == name:
            if name in kwargs:
                return kwargs[name]
            if index < len(args) and not argument.kwarg_only:
                return args[index]
            return argument.default_value if argument.has_default_value() else None
    return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _constant_count(kind: str, value) -> int:
    """Product of the integer constants of a size argument: dimensions ≥ 0 for ``shape`` (``-1`` and nodes
    skipped), positive ``before + after`` sums for ``pads`` (pairs holding a node skipped)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if kind == "pads":
        pairs = zip(values[0::2], values[1::2])
        values = [a + b for a, b in pairs if type(a) is int and type(b) is int and a + b > 0]
    count = 1
    for dim in values:
        if type(dim) is int and dim >= 0:
            count *= dim
    return count


def _arange_count(op: torch._ops.OpOverload, args: tuple, kwargs: dict, where: str) -> int:
    """Elements of ``arange(start, end, step)`` when all three are constants in the file (else 0)."""
    start, end, step = (_argument(op, args, kwargs, n) for n in ("start", "end", "step"))
    start, step = 0 if start is None else start, 1 if step is None else step
    if not all(_is_number(v) for v in (start, end, step)) or not step:
        return 0
    if all(type(v) is int for v in (start, end, step)):
        return max(-(-(end - start) // step), 0)  # exact for integers of any size
    if any(isinstance(v, float) and not math.isfinite(v) for v in (start, end, step)):
        raise ArtifactError(f"{where}: {op_name(op)} has a bound that is not finite ({start}, {end}, {step})")
    try:
        return max(math.ceil((end - start) / step), 0)
    except OverflowError:  # an integer bound beyond float range
        return MAX_CREATED_ELEMENTS + 1


def check_created_size(op: torch._ops.OpOverload, args: tuple, kwargs: dict, where: str) -> None:
    """Refuse a node that would build a tensor of more than :data:`MAX_CREATED_ELEMENTS` elements from size
    constants in the file (``aten.full([2**20, 2**20], …)``). Sizes that come from nodes are not known here."""
    if op.namespace != "aten":
        return
    if op._opname == "arange":
        count, shown = _arange_count(op, args, kwargs, where), "start/end/step"
    elif op._opname in SIZE_ARGUMENTS:
        kind, name = SIZE_ARGUMENTS[op._opname]
        value = _argument(op, args, kwargs, name)
        count, shown = _constant_count(kind, value), f"{name}={str(value)[:80]}"
    else:
        return
    if count > MAX_CREATED_ELEMENTS:
        raise ArtifactError(f"{where}: {op_name(op)} ({shown}) would create {count} elements, more than the "
                            f"{MAX_CREATED_ELEMENTS} (2**31) a .qpt graph may create from constants")  # fmt: skip


# -- failures while running ---------------------------------------------------------------------------
class _NodeLocator(fx.Interpreter):
    """Runs the graph node by node; the first node that raises is reported as :class:`ArtifactRuntimeError`."""

    def __init__(self, module: fx.GraphModule):
        super().__init__(module)
        self.extra_traceback = False  # the error is reported here, with the node's index and name
        self.index = {node: index for index, node in enumerate(module.graph.nodes)}

    def run_node(self, node: fx.Node):
        try:
            return super().run_node(node)
        except Exception as error:  # noqa: BLE001 - any failure inside the node is reported with the node
            where = f"graph member: node {self.index[node]} ({node.name})"
            raise ArtifactRuntimeError(f"{where}: {_target_text(node.target)} failed while running the loaded graph: "
                                       f"{type(error).__name__}: {error}") from error  # fmt: skip


def _target_text(target) -> str:
    """``aten.index_select.default``, ``_operator.getitem``: the name the graph member gives a call target."""
    if isinstance(target, torch._ops.OpOverload):
        return op_name(target)
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', target)}"


def _flat_inputs(gm: fx.GraphModule, named: dict) -> list:
    """The placeholder values of a call whose arguments are ``named``, flattened as the generated ``forward``
    flattens them."""
    info = gm.graph._codegen.pytree_info
    spec, names = info.in_spec, info.orig_args
    if spec.type is tuple and spec.num_children == 2 and spec.child(1).type is dict:
        count = spec.child(0).num_children
        keywords = {key: named[n] for key, n in zip(spec.child(1).context, names[count:])}
        tree = ([named[n] for n in names[:count]], keywords)
    else:
        tree = [named[n] for n in names]
    return torch.fx._pytree.tree_flatten_spec(tree, spec)


def locate_failure(gm: fx.GraphModule, forward, args: tuple, kwargs: dict) -> ArtifactRuntimeError | None:
    """Replay a failed call of ``gm`` node by node; the error naming the node that fails, or ``None`` when the
    arguments do not bind to ``forward``'s signature, or the replay fails outside every node or not at all."""
    try:
        named = inspect.signature(forward).bind(gm, *args, **kwargs).arguments
        flat = _flat_inputs(gm, named)
    except Exception:  # noqa: BLE001 - the call's own arguments are wrong: the original error stands
        return None
    try:
        _NodeLocator(gm).run(*flat, enable_io_processing=False)
    except ArtifactRuntimeError as located:
        return located
    except Exception:  # noqa: BLE001 - not inside a node: the original error stands
        return None
    return None


class LoadedGraphModule(fx.GraphModule):
    """The GraphModule of a loaded ``.qpt`` graph. Its generated ``forward`` runs as usual; only when it
    raises is the call replayed under an interpreter to find the node, reported as ArtifactRuntimeError."""

    def recompile(self):
        code = super().recompile()
        cls = type(self)  # GraphModule gives each instance its own class, holding the generated forward
        cls.forward = _reporting(cls.forward)
        return code


def _reporting(forward):
    @functools.wraps(forward)
    def forward_naming_the_failed_node(self, *args, **kwargs):
        try:
            return forward(self, *args, **kwargs)
        except Exception as error:
            located = locate_failure(self, forward, args, kwargs)
            if located is None:
                raise
            raise located from error

    return forward_naming_the_failed_node
