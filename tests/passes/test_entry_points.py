"""Tiny Llama and tiny GPT-2 (Conv1D) through quantize(), compile() and torch.compile(backend="qcompile")."""

import copy

import pytest
import torch

import qcompile
from qcompile.models import tiny_gpt2, tiny_llama
from qcompile.nn import QuantizedLinear

# max |quantized - float| / max |float| on the logits, measured on these seeds and asserted with margin:
# int8 ≈ 0.006, int4-g32 ≈ 0.06, w8a8 ≈ 0.01
BOUNDS = {"int8": 0.03, "int4-g32": 0.2, "w8a8": 0.05}


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(0, 128, (2, 8)), torch.randint(0, 128, (3, 5))


@pytest.mark.parametrize("scheme", list(BOUNDS))
def test_quantize_eager(llama, ids, scheme):
    model = qcompile.quantize(copy.deepcopy(llama), scheme, progress_bar=False)
    swapped = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(swapped) == 14  # 2 layers x 7 projections; lm_head is tied and stays float
    for x in ids:
        with torch.no_grad():
            assert _rel(model(input_ids=x).logits, llama(input_ids=x).logits) < BOUNDS[scheme]


@pytest.mark.parametrize("scheme", ["int8", "int4-g32"])
def test_compile_export_path(llama, ids, scheme):
    program = qcompile.compile(llama, (), scheme, example_kwargs={"input_ids": ids[0]}, progress_bar=False)
    graph = program.module.graph
    quantized = [n for n in graph.nodes if n.target is torch.ops.qcompile.linear.default]
    assert len(quantized) == 14
    assert not any(n.target is torch.ops.aten.linear.default and "layers" in str(n.args[1]) for n in graph.nodes)
    # no float copy of a quantized weight survives
    state = dict(program.module.named_parameters()) | dict(program.module.named_buffers())
    assert not any(name.endswith("proj.weight") for name in state)
    assert sum(name.endswith(".qweight") for name in state) == 14
    eager = qcompile.quantize(copy.deepcopy(llama), scheme, progress_bar=False)
    for x in ids:  # the second shape differs from the export example in batch and sequence
        with torch.no_grad():
            got = program(input_ids=x).logits
            torch.testing.assert_close(got, eager(input_ids=x).logits, rtol=1e-4, atol=1e-5)
            assert _rel(got, llama(input_ids=x).logits) < BOUNDS[scheme]


def test_torch_compile_backend_dynamic_no_recompile(llama, ids):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(copy.deepcopy(llama), backend="qcompile", options={"recipe": "int8"}, dynamic=True)
    eager = qcompile.quantize(copy.deepcopy(llama), "int8", progress_bar=False)
    with torch.no_grad():
        for x in [*ids, torch.randint(0, 128, (4, 11))]:
            torch.testing.assert_close(_logits(compiled(input_ids=x)), eager(input_ids=x).logits, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1  # batch and sequence changes did not recompile


def test_backend_is_found_without_import():
    from torch._dynamo.backends.registry import list_backends, lookup_backend

    assert "qcompile" in list_backends(exclude_tags=())
    assert lookup_backend("qcompile").__name__ == "qcompile_backend"


def test_backend_rejects_unknown_option(llama, ids):
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(llama), backend="qcompile", options={"recipie": "int8"})
    with pytest.raises(Exception, match="unknown option 'recipie'"):
        compiled(input_ids=ids[0])


def test_gpt2_conv1d_all_entry_points():
    model = tiny_gpt2()
    x = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        reference = model(input_ids=x).logits
    eager = qcompile.quantize(copy.deepcopy(model), "int8", progress_bar=False)
    assert sum(isinstance(m, QuantizedLinear) for m in eager.modules()) == 8  # c_attn, c_proj, c_fc, mlp.c_proj x2
    program = qcompile.compile(model, (), "int8", example_kwargs={"input_ids": x}, progress_bar=False)
    sites = [e.site for e in program.plan.quantized()]
    assert len(sites) == 8 and all(s.transposed and s.kind == "addmm" for s in sites)
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), backend="qcompile", options={"recipe": "int8"})
    y = torch.randint(0, 128, (3, 4))
    with torch.no_grad():
        for out in (eager(input_ids=x).logits, program(input_ids=x).logits, _logits(compiled(input_ids=x))):
            assert _rel(out, reference) < BOUNDS["int8"]
        torch.testing.assert_close(program(input_ids=y).logits, eager(input_ids=y).logits, rtol=1e-4, atol=1e-5)


class FunctionalSites(torch.nn.Module):
    """Matmul sites that are not nn.Linear: F.linear on a parameter, x @ W, and W shared by two calls."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w_in = torch.nn.Parameter(torch.randn(48, 32))
        self.w_out = torch.nn.Parameter(torch.randn(48, 16))  # used as x @ W ([K, N])
        self.register_buffer("shared", torch.randn(32, 32))

    def forward(self, x):
        h = torch.nn.functional.linear(x, self.w_in)
        h = torch.relu(h) @ self.w_out
        h = torch.nn.functional.linear(torch.nn.functional.pad(h, (0, 16)), self.shared)
        return torch.nn.functional.linear(h, self.shared)


def test_functional_and_shared_sites_quantized_once():
    model = FunctionalSites()
    x = torch.randn(3, 5, 32)
    program = qcompile.compile(model, (x,), "int8", progress_bar=False)
    names = {e.site.name: e.site for e in program.plan.quantized()}
    assert set(names) == {"w_in", "w_out", "shared"}
    assert names["w_out"].transposed and not names["w_in"].transposed
    buffers = dict(program.module.named_buffers())
    assert sum(name.endswith("qweight") for name in buffers) == 3  # the shared buffer is packed once
    y = torch.randn(2, 9, 32)
    assert _rel(program(y), model(y)) < BOUNDS["int8"]


class BatchedWeight(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = torch.nn.Parameter(torch.randn(4, 16, 8))  # a 3-D weight: not a supported site
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):  # x: [4, T, 16]
        return self.proj(torch.bmm(x, self.experts))


def test_unsupported_matmul_stays_float_and_says_so():
    model = BatchedWeight()
    x = torch.randn(4, 3, 16)
    with pytest.warns(UserWarning, match=r"1 matmul\(s\) with a constant weight stay float.*bmm.*experts"):
        program = qcompile.compile(model, (x,), "int8", progress_bar=False)
    assert [e.site.name for e in program.plan.quantized()] == ["proj"]
    assert _rel(program(x), model(x)) < BOUNDS["int8"]


def test_backend_recompilation_reuses_packed_weights(llama, ids, monkeypatch):
    import qcompile.quantizer as quantize_module

    calls = []
    original = quantize_module.quantize_entry

    def counting(entry, weight, stats=None):
        calls.append(entry.site.name)
        return original(entry, weight, stats)

    monkeypatch.setattr(quantize_module, "quantize_entry", counting)
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(llama), backend="qcompile", options={"recipe": "int8"})  # dynamic=None
    with torch.no_grad():
        for x in [*ids, torch.randint(0, 128, (4, 11))]:
            compiled(input_ids=x)
    assert len(calls) == 14  # Dynamo may recompile for new shapes; each weight is still quantized once


class Linear(torch.nn.Module):
    """Named like nn.Linear but reads two weights (the LoRA pattern): each must be its own site."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(16, 16))
        self.extra = torch.nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight) + torch.nn.functional.linear(x, self.extra)


def test_two_weights_in_one_linear_module_are_two_sites():
    model = torch.nn.Sequential(Linear())
    x = torch.randn(3, 16)
    program = qcompile.compile(model, (x,), "int8", progress_bar=False)
    assert sorted(e.site.name for e in program.plan.quantized()) == ["0", "0.extra"]
    assert _rel(program(x), model(x)) < BOUNDS["int8"]
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), backend="qcompile", options={"recipe": "int8"})
    assert _rel(compiled(x), model(x)) < BOUNDS["int8"]


def test_backend_sees_weights_changed_in_place(llama, ids):
    torch._dynamo.reset()
    model = copy.deepcopy(llama)
    compiled = torch.compile(model, backend="qcompile", options={"recipe": "int8"})
    with torch.no_grad():
        compiled(input_ids=ids[0])
        model.model.layers[0].mlp.down_proj.weight.mul_(-1)
        with pytest.warns(UserWarning, match="changed after compilation"):
            got = compiled(input_ids=ids[0])
        expected = qcompile.quantize(copy.deepcopy(model), "int8", progress_bar=False)(input_ids=ids[0]).logits
    torch.testing.assert_close(_logits(got), expected, rtol=1e-4, atol=1e-5)


def test_eager_keeps_multihead_attention_projections_float_and_says_so():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = layer(x)
    with pytest.warns(UserWarning, match="self_attn.out_proj.*linear1"):
        quantized = qcompile.quantize(copy.deepcopy(layer), "int8", progress_bar=False)
    with torch.no_grad():
        assert _rel(quantized(x), expected) < BOUNDS["int8"]


def test_eager_swaps_every_alias_of_a_module():
    model = torch.nn.Module()
    model.a = torch.nn.Linear(8, 8)
    model.b = model.a
    qcompile.quantize(model, "int8", progress_bar=False)
    assert isinstance(model.a, QuantizedLinear) and model.b is model.a


def test_quantized_linear_refuses_a_width_hidden_by_padding():
    layer = qcompile.quantize(torch.nn.Sequential(torch.nn.Linear(100, 8)), "int4-g128", progress_bar=False)[0]
    with pytest.raises(ValueError, match="the input has 128 features, the layer takes 100"):
        layer(torch.randn(2, 128))  # 128 = K padded to a whole group: the packed shapes alone would accept it


@pytest.mark.parametrize("inline", [False, True])
def test_torch_compile_backend_through_inductor(llama, ids, inline):
    """``options={"inductor": True}``: the lowered graph compiled by inductor (on CPU the op stays one extern call;
    ``inline_kernels`` inlines CUDA calls only) matches the eager quantized model, and the AOTAutograd cache setting
    the backend turns off while it inlines is restored."""
    import torch._functorch.config

    torch._dynamo.reset()
    cache = torch._functorch.config.enable_autograd_cache
    options = {"recipe": "int8", "inductor": True, "inline_kernels": inline}
    compiled = torch.compile(copy.deepcopy(llama), backend="qcompile", options=options)
    eager = qcompile.quantize(copy.deepcopy(llama), "int8", progress_bar=False)
    with torch.no_grad():
        torch.testing.assert_close(_logits(compiled(input_ids=ids[0])), eager(input_ids=ids[0]).logits, rtol=1e-4,
                                   atol=1e-5)  # fmt: skip
    assert torch._functorch.config.enable_autograd_cache == cache
