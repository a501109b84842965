"""What a graph read from a ``.qpt`` file may call (``runtime/qpt_ops.py``): forged nodes with valid checksums
are refused at load with :class:`ArtifactError` naming the node, sizes built from constants are bounded, and a
node that fails while running is named in :class:`ArtifactRuntimeError`.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_qpt_adversarial import _Model, assemble, expect, split

from qcompile.export import export, load
from qcompile.runtime.qpt_format import FORMAT_MAJOR
from qcompile.runtime.qpt_graph import graph_to_json
from qcompile.runtime.qpt_ops import EXTRA_ATEN_OPS, MAX_CREATED_ELEMENTS, ArtifactRuntimeError, op_name, refusal


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("qpt") / "good.qpt"
    export(_Model().eval(), (torch.randn(4, 96),), "int8", path, progress_bar=False)
    return path.read_bytes()


def forge(good: bytes, *nodes: dict) -> bytes:
    """``good`` with ``nodes`` inserted before its output node, checksums recomputed."""
    manifest, blobs = split(good)
    graph = json.loads(blobs["graph"])
    graph["nodes"] = graph["nodes"][:-1] + list(nodes) + graph["nodes"][-1:]
    blobs["graph"] = json.dumps(graph).encode()
    return assemble(manifest, blobs, major=FORMAT_MAJOR)


def call(name: str, target: str, *args, **kwargs) -> dict:
    return {"name": name, "op": "call_function", "target": target, "args": list(args), "kwargs": kwargs}


X = {"node": "x"}  # the good file's input placeholder
INT64 = {"dtype": "int64"}


# -- refused at load --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "node, fragment",
    [
        (call("evil", "aten._sparse_coo_tensor_unsafe.default", X, X, [4, 4]), "skips its argument checks"),
        (call("evil", "aten._unsafe_index.Tensor", X, [X]), "skips its argument checks"),
        (call("evil", "aten.empty.memory_format", [2**40]), "uninitialized memory"),
        (call("evil", "aten.empty_strided.default", [4], [1]), "uninitialized memory"),
        (call("evil", "aten.new_empty.default", X, [4]), "uninitialized memory"),
        (call("evil", "aten.as_strided.default", X, [4, 96], [0, 1]), "raw sizes and strides"),
        (call("evil", "aten.randn.default", [4]), "draws random numbers"),
        (call("evil", "aten.cholesky.default", X), "neither in the Core ATen opset"),
        (call("evil", "prims.add.default", X, X), "not an allow-listed op"),
        (call("evil", "qcompile._linear_fallback.default", X), "private to qcompile"),
        (call("evil", "aten.zeros.default", [4], layout={"layout": "sparse_coo"}), "not a value a .qpt graph"),
    ],
    ids=lambda value: value["target"] if isinstance(value, dict) else None,
)  # fmt: skip
def test_refused_ops(good, tmp_path, node, fragment):
    index = len(json.loads(split(good)[1]["graph"])["nodes"]) - 1
    expect(tmp_path, forge(good, node), f"graph member: node {index} (evil)", fragment)


@pytest.mark.parametrize(
    "node",
    [
        call("huge", "aten.full.default", [2**20, 2**20], 1.0),
        call("huge", "aten.zeros.default", [{"node": "size"}, 2**16, 2**16]),
        call("huge", "aten.new_ones.default", X, size=[2**31 + 1]),
        call("huge", "aten.expand.default", X, [2**22, -1, 2**10]),
        call("huge", "aten.repeat.default", X, [2**16, 2**16]),
        call("huge", "aten.arange.default", 2**40),
        call("huge", "aten.arange.start_step", 0.0, 1e12, 0.5),
        call("huge", "aten.arange.start_step", 0.5, 10**400, 1),
        call("huge", "aten.constant_pad_nd.default", X, [2**16, 2**16, 2**15, 2**15]),
    ],
    ids=lambda value: value["target"],
)
def test_sizes_from_constants_are_bounded(good, tmp_path, node):
    size = call("size", "aten.sym_size.int", X, 0)
    expect(tmp_path, forge(good, size, node), "(huge)", node["target"], f"more than the {MAX_CREATED_ELEMENTS}")


def test_symbolic_helper_on_constants_alone_is_refused(good, tmp_path):
    """Constant arithmetic would otherwise hand aten.full a size that the load-time bound never sees."""
    product = call("product", "_operator.mul", 2**20, 2**20)
    full = call("full", "aten.full.default", [{"node": "product"}], 0.0)
    expect(tmp_path, forge(good, product, full), "(product)", "_operator.mul is given only constants")


def test_non_finite_arange_is_refused(good, tmp_path):
    expect(tmp_path, forge(good, call("r", "aten.arange.default", {"float": "inf"})), "(r)", "not finite")


# -- allowed ---------------------------------------------------------------------------------------------
def test_allowed_ops_and_sizes_load_and_run(good, tmp_path):
    """Core ops (and symbolic sizes, which are not bounded at load) are accepted; the forged nodes run."""
    path = tmp_path / "ok.qpt"
    path.write_bytes(forge(
        good,
        call("size", "aten.sym_size.int", X, 0),
        call("full", "aten.full.default", [{"node": "size"}, 2**10, 2**10], 0.5),
        call("steps", "aten.arange.start_step", 0, 2**20, 2, dtype=INT64),
        call("pad", "aten.constant_pad_nd.default", X, [1, 1, -1, -1]),
        call("doubled", "aten.expand.default", X, [2, -1, -1]),
    ))  # fmt: skip
    program = load(path)
    assert program(torch.randn(3, 96)).shape == (3, 16)


def test_every_extra_op_exists_and_is_allowed():
    for name in EXTRA_ATEN_OPS:
        _, op_packet, overload = name.split(".")
        op = getattr(getattr(torch.ops.aten, op_packet), overload)
        assert op_name(op) == name and refusal(op) is None, (name, refusal(op))


def test_rule_on_core_and_qcompile_ops():
    aten = torch.ops.aten
    assert refusal(aten.add.Tensor) is None and refusal(aten.index_select.default) is None
    assert refusal(torch.ops.qcompile.linear.default) is None  # any public qcompile op, whatever its schema
    assert refusal(aten._native_batch_norm_legit.default) == "it mutates its inputs"  # core, but mutates
    assert "Core ATen" in refusal(aten.bernoulli.default)


def test_writer_refuses_what_the_reader_refuses():
    class Blank(torch.nn.Module):
        def forward(self, x):
            return torch.empty_like(x)

    gm = torch.export.export(Blank(), (torch.randn(2, 3),)).module()
    with pytest.raises(ValueError, match="aten.empty_like.default cannot be written.*uninitialized memory"):
        graph_to_json(gm)


# -- failures while running ----------------------------------------------------------------------------------
def test_runtime_failure_names_the_node(good, tmp_path):
    path = tmp_path / "bad_index.qpt"
    index = len(json.loads(split(good)[1]["graph"])["nodes"])  # the second forged node's position
    path.write_bytes(forge(
        good,
        call("far", "aten.full.default", [2], 1000, dtype=INT64),
        call("picked", "aten.index_select.default", X, 0, {"node": "far"}),
    ))  # fmt: skip
    program = load(path)  # loads: nothing is wrong until the values are known
    with pytest.raises(ArtifactRuntimeError) as info:
        program(torch.randn(3, 96))
    message = str(info.value)
    for fragment in (f"graph member: node {index} (picked)", "aten.index_select.default", "IndexError",
                     "out of range"):  # fmt: skip
        assert fragment in message, message
    assert isinstance(info.value.__cause__, IndexError)


def test_caller_errors_are_not_blamed_on_the_file(good, tmp_path):
    """Errors outside every node (the call's own arguments) keep their type; the loader's input check too."""
    path = tmp_path / "ok.qpt"
    path.write_bytes(good)
    program = load(path)
    with pytest.raises(TypeError) as info:
        program(torch.randn(3, 96), torch.randn(3, 96))
    assert not isinstance(info.value, ArtifactRuntimeError)
    with pytest.raises(ValueError, match="input 'x': dtype") as info:
        program(torch.zeros(3, 96, dtype=torch.long))
    assert not isinstance(info.value, ArtifactRuntimeError)


def test_failure_inside_a_node_on_caller_input_names_the_node(good, tmp_path):
    """A wrong input the input check lets through (a dynamic dimension) fails inside a node, which is named."""
    path = tmp_path / "ok.qpt"
    path.write_bytes(good)
    program = load(path)
    with pytest.raises(ArtifactRuntimeError, match=r"graph member: node \d+ \(\w+\): qcompile.linear.default"):
        program(torch.randn(3, 95))
