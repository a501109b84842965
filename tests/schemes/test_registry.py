"""The family registry: every family through ``torch.library.opcheck``, its declared tensors against what it packs,
and no family named in the central code (passes, dispatch, the op, the ``.qpt`` reader, ONNX preparation, the C++
op and ABI)."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest
import torch

import qcompile  # noqa: F401  (registers torch.ops.qcompile.linear)
from qcompile.recipe import ALGORITHMS
from qcompile.schemes import Scheme, parse_scheme
from qcompile.schemes.registry import families, family

ROOT = pathlib.Path(__file__).resolve().parents[2]
FLOAT8 = {torch.float8_e4m3fn, torch.float8_e5m2, getattr(torch, "float8_e8m0fnu", torch.float8_e4m3fn)}
EXAMPLES = [(record.name, name) for record in families() for name in record.examples]

#: the files every family goes through; none may name one
CENTRAL = [
    *sorted((ROOT / "passes").glob("*.py")),
    *sorted((ROOT / "runtime").glob("*.py")),
    ROOT / "qcompile" / "nn.py",
    ROOT / "qcompile" / "quantizer.py",
    ROOT / "qcompile" / "plan.py",
    ROOT / "qcompile" / "onnx" / "prepare.py",
    ROOT / "qcompile" / "onnx" / "exporter.py",
    ROOT / "qcompile" / "onnx" / "families" / "__init__.py",
    # an algorithm named after a family (aqlm, spqr) writes that family only: it belongs to the family's code
    *(p for p in sorted((ROOT / "qcompile" / "algorithms").glob("*.py"))
      if p.stem not in {f.name for f in families()}),
    ROOT / "codegen" / "cpp" / "op.py",
    ROOT / "codegen" / "cpp" / "library.py",
    ROOT / "codegen" / "cpp" / "launch.py",
    ROOT / "codegen" / "cpp" / "build.py",
]
CENTRAL_CPP = [ROOT / "codegen" / "cpp" / "op" / "qcompile_op.cpp", ROOT / "codegen" / "cpp" / "qc_abi.h",
               ROOT / "codegen" / "cpp" / "cpu_features.cpp"]  # fmt: skip


def test_every_family_is_registered_with_examples_that_parse_to_it():
    assert len(families()) >= 5
    for record in families():
        assert record.examples, record.name
        for name in record.examples:
            scheme = parse_scheme(name)
            assert scheme.family == record.name and scheme.name == name, (record.name, name)
            assert family(scheme.family) is record


@pytest.mark.parametrize("family_name, name", EXAMPLES)
@pytest.mark.parametrize("n, k", [(24, 80), (9, 256)])
def test_declared_tensors_are_what_pack_writes(family_name, name, n, k):
    scheme = parse_scheme(name)
    packed = scheme.pack(scheme.quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(0))))
    specs = scheme.tensors(n, k)
    assert packed.names() == [spec.name for spec in specs]
    for spec, tensor in zip(specs, packed.list()):
        assert tuple(tensor.shape) == tuple(spec.shape) and tensor.dtype == spec.dtype, (spec, tensor.shape)
        assert spec.doc, f"{name}: tensor {spec.name} has no documentation"
    assert packed.nbytes == scheme.packed_nbytes(n, k)


@pytest.mark.parametrize("family_name, name", EXAMPLES)
def test_opcheck_every_family(family_name, name):
    """Schema, fake impl, autograd registration and AOT dispatch, on a ragged K, with and without bias."""
    n, k = 24, 80
    scheme = parse_scheme(name)
    generator = torch.Generator().manual_seed(1)
    packed = scheme.pack(scheme.quantize(torch.randn(n, k, generator=generator))).list()
    x = torch.randn(3, k, generator=generator, requires_grad=True)
    bias = torch.randn(n, generator=generator)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if name != family(family_name).examples[0]:  # AOT tracing of the one op: once per family (the slow check)
        utils = utils[:-1]
    if any(t.dtype in FLOAT8 for t in packed):
        # torch's SchemaCheckMode compares inputs with ``mul``, which has no float8 kernel: the mutation check is
        # done here on the bytes instead
        utils = utils[1:]
        before = [t.view(torch.uint8).clone() for t in packed]
        torch.ops.qcompile.linear(x, packed, bias, name, k, n)
        assert all(torch.equal(a, t.view(torch.uint8)) for a, t in zip(before, packed))
    for b in (bias, None):
        torch.library.opcheck(torch.ops.qcompile.linear.default, (x, packed, b, name, k, n), test_utils=utils)


@pytest.mark.parametrize("family_name, name", EXAMPLES)
def test_wrong_tensor_list_is_refused_naming_the_tensor(family_name, name):
    n, k = 16, 64
    scheme = parse_scheme(name)
    packed = scheme.pack(scheme.quantize(torch.randn(n, k))).list()
    x = torch.randn(2, k)
    count = rf"{name} takes {len(packed)} packed tensors.*got {len(packed) - 1}"
    with pytest.raises((ValueError, RuntimeError), match=count):
        torch.ops.qcompile.linear(x, packed[:-1], None, name, k, n)
    wrong = [t.to(torch.float64) if i == 0 else t for i, t in enumerate(packed)]
    with pytest.raises((ValueError, RuntimeError), match=scheme.tensors(n, k)[0].name):
        torch.ops.qcompile.linear(x, wrong, None, name, k, n)


def _scheme_classes() -> set[str]:
    out, todo = set(), [Scheme]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            out.add(sub.__name__)
            todo.append(sub)
    return out


def _family_words() -> set[str]:
    words = {record.name for record in families()}
    for record in families():
        words.update(record.examples)
    words -= set(ALGORITHMS)  # "aqlm", "spqr": also the names of the algorithms that write those families
    return {w for w in words if not isinstance(getattr(torch, w, None), torch.dtype)}  # "int8" is also a dtype


def test_no_family_is_named_in_central_python():
    """No ``isinstance`` against a scheme class, no comparison or prefix test against a family or scheme name."""
    classes, words = _scheme_classes(), _family_words()
    problems = []
    for path in CENTRAL:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                names |= {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
                if names & classes:
                    problems.append(f"{where}: isinstance against {sorted(names & classes)}")
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("startswith", "endswith"):
                consts = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
                if any(any(w.startswith(c) or c.startswith(w) for w in words) for c in consts if c):
                    problems.append(f"{where}: prefix test against a scheme name {consts}")
            if isinstance(node, (ast.Compare, ast.Dict, ast.Set, ast.Tuple, ast.List)) and not isinstance(
                    getattr(node, "ctx", None), ast.Store):  # fmt: skip
                consts = {c.value for c in ast.iter_child_nodes(node)
                          if isinstance(c, ast.Constant) and isinstance(c.value, str)}  # fmt: skip
                if isinstance(node, ast.Compare):
                    consts |= {c.value for c in node.comparators if isinstance(c, ast.Constant)}
                    for c in node.comparators:
                        if isinstance(c, (ast.Tuple, ast.List, ast.Set)):
                            consts |= {e.value for e in c.elts if isinstance(e, ast.Constant)}
                if consts & words:
                    problems.append(f"{where}: names {sorted(consts & words)}")
    assert not problems, "family names in central code:\n" + "\n".join(problems)


def test_no_family_is_named_in_the_cpp_op_or_abi():
    words = {record.name for record in families()} | {w for record in families() for w in record.examples}
    problems = []
    for path in CENTRAL_CPP:
        code = re.sub(r"//[^\n]*|/\*.*?\*/", "", path.read_text(), flags=re.S)  # comments may explain
        for word in sorted(words):
            for match in re.finditer(rf"(?<![\w-]){re.escape(word)}(?![\w-])", code):
                problems.append(f"{path.relative_to(ROOT)}: {word!r} at offset {match.start()}")
        for kind in ("enum Kind", "W4A16", "W8A16", "W8A8", "W4A8"):
            if kind in code:
                problems.append(f"{path.relative_to(ROOT)}: {kind!r}")
    assert not problems, "\n".join(problems)


def test_the_scanner_finds_a_planted_family_name(tmp_path):
    """The central-code scan is not vacuous: a planted ``if scheme.name == 'int4-g128'`` and an ``isinstance`` are
    found."""
    planted = tmp_path / "planted.py"
    planted.write_text("def f(scheme):\n    if scheme.name == 'int4-g128':\n        return 1\n"
                       "    return isinstance(scheme, IntWeightOnly)\n")  # fmt: skip
    saved = CENTRAL[:]
    global ROOT
    root = ROOT
    try:
        CENTRAL[:] = [planted]
        ROOT = tmp_path
        with pytest.raises(AssertionError, match=r"planted.py:2: names \['int4-g128'\][\s\S]*isinstance"):
            test_no_family_is_named_in_central_python()
    finally:
        CENTRAL[:] = saved
        ROOT = root


def test_every_example_round_trips_through_a_qpt(tmp_path):
    """Every example of every family on one small Llama: export, load, the same logits bit for bit and the same
    packed bytes (each site's tensors are checked against its scheme's declared specs on load)."""
    from qcompile.export import export, load
    from qcompile.models import tiny_llama
    from qcompile.passes.capture import _fetch

    names = [name for _, name in EXAMPLES]
    layers = -(-len(names) // 7)  # 7 matmul sites per layer
    model = tiny_llama(seed=0, layers=layers)
    sites = [f"model.layers.{i}.{part}" for i in range(layers) for part in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")]  # fmt: skip
    recipe = {"default": None, "overrides": [{"targets": [site], "scheme": name} for site, name in zip(sites, names)]}
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    path = tmp_path / "families.qpt"
    program = export(model, (), recipe, path, example_kwargs={"input_ids": ids}, progress_bar=False)
    assert {e.scheme for e in program.plan.quantized()} == set(names)
    loaded = load(path)
    x = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, program(input_ids=x).logits, rtol=0, atol=0)
    for name, tensor in loaded.module.named_buffers():
        assert torch.equal(tensor.view(torch.uint8), _fetch(program.module, name).view(torch.uint8)), name
