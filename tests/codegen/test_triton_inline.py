"""Inlined launches: ``qcompile::linear`` calls traced into their Triton kernels for inductor to compile.

Three views, since this host has no GPU:

* the traced-mode launchers run for real under the interpreter (CPU tensors) and must match the reference op, with
  every kernel call going through ``wrap_triton`` and no process-wide workspace touched;
* in a subprocess with compiled (not interpreted) kernels, AOTAutograd traces calls on fake CUDA tensors and the
  graph must hold the expected kernel launches, with the default or tuned config, and no opaque op; with inlining
  off, under ``torch.export``'s setting and on CPU tensors the op must stay whole;
* on a GPU (``gpu`` mark), ``torch.compile`` through inductor with inlining must match the reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from qcompile.codegen.triton import autotune, common, paths, traceable  # noqa: E402
from qcompile.schemes import parse_scheme  # noqa: E402

from test_triton_kernels import DEVICE, INTERPRETED, activation, assert_matches_reference, packed  # noqa: E402

pytestmark = pytest.mark.triton

SCHEMES = {"int4": "int4-g32", "w8a16": "int8", "w8a8": "w8a8"}
KERNELS = {"int4-gemv": {"int4_gemv_kernel"}, "int4-splitk": {"int4_linear_kernel"},
           "int4-gemm": {"int4_linear_kernel"}, "w8a16-gemv": {"w8a16_linear_kernel"},
           "w8a16-splitk": {"w8a16_linear_kernel"}, "w8a16-gemm": {"w8a16_linear_kernel"},
           "w8a8-gemm": {"quantize_rows_kernel", "w8a8_linear_kernel"}}  # fmt: skip


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter's view; a GPU runs test_inductor_inlines_on_gpu")
@pytest.mark.parametrize(
    "row_name,symmetric",
    [(row.name, False) for row in paths.PATHS] + [(row.name, True) for row in paths.PATHS if "int4" in row.name],
)
def test_traced_launches_compute_the_op(row_name, symmetric, monkeypatch):
    """Every row's launcher in traced mode, run for real: each kernel goes through ``wrap_triton`` (which hands the
    interpreter's kernel back), split-K workspaces are fresh tensors, and the result is the reference op's."""
    family, path = row_name.split("-")[1:]
    row = next(r for r in paths.PATHS if r.name == row_name)
    scheme_name = SCHEMES[family] + ("-sym" if symmetric else "")
    m, k, n = {"gemv": 3, "splitk": 6, "gemm": 17}[path], 96, 48
    qweight, scales, zeros = packed(scheme_name, n, k)
    x = activation(m, k, torch.float16)
    bias = torch.randn(n, dtype=torch.float16)
    wrapped = []
    monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: wrapped.append(kernel.fn.__name__) or kernel)
    workspaces = dict(common._WORKSPACES)
    with common.traced_launches():
        assert common.tracing()
        tensors = [t for t in (qweight, scales, zeros) if t is not None]
        y = row.bind(parse_scheme(scheme_name), x, tensors, bias, n)(x, tensors, bias)
    assert not common.tracing()
    assert_matches_reference(y, x, qweight, scales, zeros, bias, scheme_name, 2e-2)
    assert KERNELS[f"{family}-{path}"] <= set(wrapped), wrapped
    assert common._WORKSPACES == workspaces


def test_real_like_makes_tensors_every_kernel_takes():
    tensors = [torch.empty(4, 6, dtype=torch.bfloat16).t()]
    tensors += [
        torch.empty(n, dtype=dtype) for n, dtype in ((5, torch.uint8), (3, torch.int8), (2, torch.float8_e4m3fn))
    ]
    like = (*tensors, None, torch.float16)
    real = traceable.real_like(like)
    assert real[4] is None and real[5] is torch.float16
    for made, wanted in zip(real[:4], like[:4]):
        assert (made.shape, made.stride(), made.dtype, made.device) == (
            wanted.shape, wanted.stride(), wanted.dtype, wanted.device)  # fmt: skip
    assert 0 <= real[0].float().min() and real[0].float().max() < traceable.TUNING_MAGNITUDE
    assert real[2].min() >= -127
    assert torch.equal(real[1], traceable.real_like(like)[1])  # seeded: the same search inputs every time


def test_traced_choice(monkeypatch):
    """While tracing, a key's config is the tuned one, else tuned now on real tensors (outside the trace), else the
    default; the traced launch runs with it."""
    default, tuned, cached = (autotune.KernelConfig(16, b, 32) for b in (16, 32, 64))
    store = autotune.TunedConfigs(None)
    monkeypatch.setattr(autotune, "STORE", store)
    monkeypatch.setattr(autotune, "interpreting", lambda: False)
    searches, launches = [], []

    def choose(key, candidates, default_config, launch, device):
        searches.append(key)
        launch(tuned)
        return tuned

    monkeypatch.setattr(autotune, "choose_config", choose)

    def bound(key):
        build = lambda config, variant: lambda *tensors: launches.append((config, common.tracing(), tensors))  # noqa: E731
        return autotune.BoundLaunches(lambda: key, lambda: [], lambda: default, build, torch.device("cuda"))

    traced = torch.zeros(2)
    with common.traced_launches():  # no real tensors: the default, no search
        bound("a")(None, traced)
    assert searches == [] and launches[-1] == (default, True, (traced,))
    real = torch.ones(2)
    with common.traced_launches(lambda tensors: (real,)):
        bound("b")(None, traced)
    assert searches == ["b"] and launches[-2] == (tuned, False, (real,))  # the search ran on real tensors
    assert launches[-1] == (tuned, True, (traced,)) and len(launches) == 3  # no second real launch of the winner
    store.put("c", cached)
    with common.traced_launches(lambda tensors: (real,)):
        bound("c")(None, traced)
    assert searches == ["b"] and launches[-1] == (cached, True, (traced,))
    assert launches[-2] == (cached, False, (real,))  # a config no search ran is launched once for real first
    monkeypatch.setenv("QCOMPILE_TRITON_TUNE", "0")
    with common.traced_launches(lambda tensors: (real,)):
        bound("d")(None, traced)
    assert searches == ["b"] and launches[-2:] == [(default, False, (real,)), (default, True, (traced,))]
    monkeypatch.delenv("QCOMPILE_TRITON_TUNE")

    def traced_call(x):  # under a real tracer: the tuning tensors and launch stay out of the graph
        with common.traced_launches(traceable.real_like):
            bound("e")(None, x)
        return x

    graph = make_fx(traced_call, tracing_mode="fake")(torch.zeros(3, 2))
    assert searches == ["b", "e"] and [n.op for n in graph.graph.nodes] == ["placeholder", "output"]
    config, was_tracing, (tuned_on,) = launches[-2]
    assert (config, was_tracing, type(tuned_on), tuned_on.shape) == (tuned, False, torch.Tensor, (3, 2))


# -- the graph AOTAutograd records: compiled kernels, fake CUDA tensors, in a fresh process --------------------------
TRACE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, warnings
    os.environ["TRITON_INTERPRET"] = "0"
    import torch
    from torch._functorch.aot_autograd import aot_export_module
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from qcompile.codegen.triton import autotune, common, int4, traceable
    from qcompile.runtime import dispatch
    from qcompile.schemes import parse_scheme

    common.device_capability = lambda device: (9, 0)  # no GPU here: the facts of an H100
    autotune.device_name = common.device_name = lambda device: "traced-h100"
    asked = []  # calls for real tensors (to tune on, or to launch an untried config once); none here: no GPU
    traceable.real_like = lambda tensors: asked.append(len(tensors))  # None: the default config unless one is cached


    class Linear(torch.nn.Module):
        def __init__(self, scheme, tensors, n, k):
            super().__init__()
            self.scheme, self.n, self.k = scheme, n, k
            self.names = [name for name, tensor in tensors.items() if tensor is not None]
            for name in self.names:
                self.register_buffer(name, tensors[name])

        def forward(self, x):
            packed = [getattr(self, name) for name in self.names]
            return (torch.ops.qcompile.linear(x, packed, None, self.scheme, self.k, self.n),)


    def trace(scheme_name, m, n, k, device="cuda", inline=True, symbolic=False, export=False):
        scheme = parse_scheme(scheme_name)
        packed = scheme.pack(scheme.quantize(torch.randn(n, k)))
        shape_env = ShapeEnv() if symbolic else None
        with FakeTensorMode(allow_non_fake_inputs=True, shape_env=shape_env):
            tensors = {name: None if t is None else torch.empty(t.shape, dtype=t.dtype, device=device)
                       for name, t in (("qweight", packed.qweight), ("scales", packed.scales),
                                       ("zeros", packed.get("zeros")))}
            if symbolic:  # M a symbol, as under torch.compile(dynamic=True)
                source = ConstantSource("m")
                m = shape_env.create_symintnode(shape_env.create_symbol(m, source=source), hint=m, source=source)
            x = torch.empty(m, k, device=device, dtype=torch.bfloat16)
        with dispatch.inline_kernels(inline), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if export:
                graph = torch.export.export(Linear(scheme_name, tensors, n, k), (x,)).run_decompositions({}).graph_module
            else:
                graph, _ = aot_export_module(Linear(scheme_name, tensors, n, k), (x,), trace_joint=False)
        nodes = []
        for node in graph.graph.nodes:
            if node.op != "call_function" or node.target.__name__ == "getitem":
                continue
            if "triton_kernel_wrapper" not in str(node.target):
                nodes.append(str(node.target))
                continue
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            config = kernel.configs[0] if hasattr(kernel, "configs") else None
            args = {key: value for key, value in node.kwargs["kwargs"].items() if isinstance(value, (int, bool))}
            out_node = node.kwargs["kwargs"].get("out_ptr")
            aliases = sorted(key for key, value in node.kwargs["kwargs"].items()
                             if value is out_node and key != "out_ptr")
            nodes.append({"kernel": kernel.fn.__name__, "grid": [list(g) for g in node.kwargs["grid"]],
                          "aliases_of_out": aliases,
                          "num_warps": getattr(config, "num_warps", None),
                          "num_stages": getattr(config, "num_stages", None), "args": args})
        return {"nodes": nodes, "warnings": [str(w.message) for w in caught if "qcompile" in str(w.message)]}


    def cache(key_args, config):
        autotune.STORE.put(int4.tune_key(*key_args), config)


    out = {}
    out["gemv"] = trace("int4-g128", 1, 256, 512)
    os.environ["QCOMPILE_TRITON_TUNE"] = "0"  # no search: what asks for real tensors is an untried config's launch
    before = len(asked)
    out["probed"] = trace("int4-g128", 1, 320, 512)
    out["asked"] = len(asked) - before
    out["probed-again"] = trace("int4-g128", 1, 320, 512)  # the signature's launcher and launches are reused
    out["asked-again"] = len(asked) - before - out["asked"]
    del os.environ["QCOMPILE_TRITON_TUNE"]
    out["gemm"] = trace("int4-g128", 64, 256, 512)
    out["w8a16"] = trace("int8", 8, 256, 512)
    out["w8a8"] = trace("w8a8", 4, 256, 512)
    out["off"] = trace("int4-g128", 1, 256, 512, inline=False)
    out["cpu"] = trace("int4-g128", 1, 256, 512, device="cpu")
    out["export"] = trace("int4-g128", 1, 256, 512, export=True)
    out["dynamic"] = trace("int4-g128", 2, 256, 512, symbolic=True)
    torch._functorch.config.decompose_custom_triton_ops = False  # what torch.export sets while it traces
    out["no-decompositions"] = trace("int4-g128", 1, 256, 512)
    torch._functorch.config.decompose_custom_triton_ops = True
    tuned = autotune.KernelConfig(1, 64, 64, split_k=2, num_warps=2, num_stages=2, words=1)
    cache(("gemv", 1, 384, 512, 128, torch.device("cuda"), False, True), tuned)
    out["cached"] = trace("int4-g128", 1, 384, 512)
    out["defaults"] = {"gemv": int4.default_config("gemv", 1, 128, True).to_dict(),
                       "gemm": int4.default_config("gemm", 64, 128, True).to_dict()}
    def broken(self, *tensors):
        raise RuntimeError("no launch")

    int4.Launch.__call__ = broken  # a row whose tracing fails midway: said once, the op stays whole
    out["broken"] = trace("int4-g64", 1, 256, 512)
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def traced_graphs(tmp_path_factory):
    from qcompile.codegen.cpp import build, library

    cache = tmp_path_factory.mktemp("cache")  # a fresh tuning store; the C++ libraries built already are shared
    library.library_file()
    for part in ("cpp", "op"):
        if (build.cache_root() / part).is_dir():
            (cache / part).symlink_to(build.cache_root() / part, target_is_directory=True)
    env = dict(os.environ, QCOMPILE_CACHE_DIR=str(cache), TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-c", TRACE_SCRIPT], capture_output=True, text=True, env=env,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _launches(graph):
    return [node for node in graph["nodes"] if isinstance(node, dict)]


def _ops(graph):
    return [node for node in graph["nodes"] if isinstance(node, str)]


def test_gemv_becomes_its_kernel_launch(traced_graphs):
    """One row, int4-g128 asymmetric: the word-form GEMV with the default config (128 columns a program, K split 8
    ways), its split-K workspace zeroed in the graph, and no opaque op left."""
    graph, default = traced_graphs["gemv"], traced_graphs["defaults"]["gemv"]
    (launch,) = _launches(graph)
    assert launch["kernel"] == "int4_gemv_kernel"
    assert launch["grid"] == [[256 // default["block_n"], default["split_k"], 1]]
    assert launch["args"]["WORDS"] is True and launch["args"]["SPLIT"] is True
    assert launch["args"]["BLOCK_N"] == default["block_n"] and launch["args"]["BLOCK_M"] == default["block_m"]
    assert (launch["num_warps"], launch["num_stages"]) == (default["num_warps"], default["num_stages"])
    assert _ops(graph).count("aten.zeros.default") == 2
    assert not any("qcompile" in op for op in _ops(graph))


def test_a_signature_traced_again_reuses_its_launches(traced_graphs):
    """The second trace of a call signature runs the launcher and launches eager calls of it share: the same
    graph, and no new request for real tensors (which on a GPU would tune, or launch an untried config once)."""
    assert traced_graphs["asked"] == 1 and traced_graphs["asked-again"] == 0
    assert traced_graphs["probed-again"] == traced_graphs["probed"] and _launches(traced_graphs["probed"])


def test_gemm_becomes_tile_sums_and_the_word_dot(traced_graphs):
    graph, default = traced_graphs["gemm"], traced_graphs["defaults"]["gemm"]
    sums, dot = _launches(graph)
    assert (sums["kernel"], dot["kernel"]) == ("tile_sums_kernel", "int4_linear_kernel")
    assert dot["args"]["WORDS"] and dot["args"]["TILE_SUMS"] and not dot["args"]["SPLIT"]
    assert (dot["args"]["BLOCK_M"], dot["args"]["BLOCK_N"], dot["args"]["BLOCK_K"]) == (
        default["block_m"], default["block_n"], default["block_k"])  # fmt: skip
    assert sums["args"]["WIDTH"] == dot["args"]["BLOCK_K"]
    assert not any("qcompile" in op for op in _ops(graph))


def test_w8a16_and_w8a8_become_their_launches(traced_graphs):
    assert [launch["kernel"] for launch in _launches(traced_graphs["w8a16"])] == ["w8a16_linear_kernel"]
    assert _launches(traced_graphs["w8a16"])[0]["args"]["SPLIT"] is True  # M = 8: the split-K path
    assert [launch["kernel"] for launch in _launches(traced_graphs["w8a8"])] == [
        "quantize_rows_kernel", "w8a8_linear_kernel"]  # fmt: skip


def test_a_tuned_config_is_what_the_graph_launches(traced_graphs):
    (launch,) = _launches(traced_graphs["cached"])
    assert launch["grid"] == [[384 // 64, 2, 1]]
    assert (launch["args"]["BLOCK_N"], launch["args"]["BLOCK_K"], launch["num_warps"], launch["num_stages"]) == (
        64, 64, 2, 2)  # fmt: skip


def test_no_launch_argument_aliases_the_output(traced_graphs):
    """Functionalization clones every argument a launch may write; an argument that aliases the output (the unused
    workspace of an unsplit launch, in eager calls) could have its clone taken for the result."""
    for case in ("gemv", "gemm", "w8a16", "w8a8", "cached"):
        for launch in _launches(traced_graphs[case]):
            assert launch["aliases_of_out"] == [], (case, launch["kernel"], launch["aliases_of_out"])


@pytest.mark.parametrize("case", ["off", "cpu", "export", "dynamic", "no-decompositions"])
def test_the_op_stays_whole(traced_graphs, case):
    """Inlining off, CPU tensors, ``torch.export`` (and its ``run_decompositions``), a symbolic M (one graph for all
    M, not one per bucket), and the setting with which torch.export switches decompositions of custom Triton ops off:
    the graph keeps one ``qcompile::linear`` call."""
    graph = traced_graphs[case]
    assert _launches(graph) == [] and _ops(graph).count("qcompile.linear.default") == 1


def test_a_row_that_fails_to_trace_leaves_the_op_and_says_so(traced_graphs):
    graph = traced_graphs["broken"]
    assert _launches(graph) == [] and _ops(graph).count("qcompile.linear.default") == 1
    assert any("could not be inlined" in message for message in graph["warnings"]), graph["warnings"]


# -- on a GPU: inductor compiles the inlined kernels -----------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("scheme_name,m", [("int4-g128", 1), ("int4-g128-sym", 64), ("int8", 8), ("w8a8", 64)])
def test_inductor_inlines_on_gpu(scheme_name, m):
    from torch._inductor.utils import run_and_get_code

    import qcompile  # noqa: F401 - registers the backend

    k, n = 512, 384
    model = torch.nn.Sequential(torch.nn.Linear(k, n), torch.nn.GELU()).to("cuda", torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    options = {"recipe": scheme_name, "inductor": True, "inline_kernels": True}
    compiled = torch.compile(model, backend="qcompile", options=options)
    y, code = run_and_get_code(compiled, x)
    quantized = torch.compile(model, backend="qcompile", options={"recipe": scheme_name})(x)  # the eager op
    error = ((y.float() - quantized.float()).abs().max() / quantized.float().abs().max()).item()
    assert error < 2e-2, error
    source = "\n".join(code)
    kernel = {"int4-g128": "int4_gemv_kernel", "int4-g128-sym": "int4_linear_kernel", "int8": "w8a16_linear_kernel",
              "w8a8": "w8a8_linear_kernel"}[scheme_name]  # fmt: skip
    assert "qcompile.linear" not in source and kernel in source
