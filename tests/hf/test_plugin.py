"""The transformers plug-in (``quant_method="qcompile"``): quantize while ``from_pretrained`` loads a float checkpoint,
save, load the saved checkpoint back bit for bit, refuse forged checkpoints and options that make no sense.

The reference for what loading produces is the independent path: the float checkpoint loaded plainly, then
``qcompile.quantize``. Tiny random Llama (tied head, K=96 ragged against the groups) and Qwen2 (untied head, biased
q/k/v projections) models, saved as float with ``save_pretrained``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import qcompile
from qcompile.nn import QuantizedLinear
from qcompile.schemes.registry import families

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.quantizers.auto import AutoQuantizationConfig  # noqa: E402

from qcompile.hf import QCompileConfig  # noqa: E402

VOCAB = 256
LAYERS = 2
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")  # fmt: skip
RECIPE = {"default": "int4-g128", "overrides": [{"targets": ["*.down_proj"], "scheme": "int8"}]}
#: scheme examples that cannot go through save_pretrained / from_pretrained unchanged, and why (none today)
CANNOT_ROUND_TRIP: dict[str, str] = {}
EXAMPLES = [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=CANNOT_ROUND_TRIP[name]))
    if name in CANNOT_ROUND_TRIP else name
    for family in families() for name in family.examples
]  # fmt: skip


def _tiny(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(config).eval()
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=128,
    )  # fmt: skip
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # random, non-zero q/k/v biases, so a lost bias shows
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.02)
    return model


@pytest.fixture(scope="module")
def float_dirs(tmp_path_factory):
    out = {}
    for kind in ("llama", "qwen2"):
        path = tmp_path_factory.mktemp(f"{kind}-float")
        _tiny(kind).save_pretrained(path)
        out[kind] = str(path)
    return out


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (2, 7))


def load(path, **kwargs):
    """``from_pretrained`` whose load report must be clean: no missing, unexpected or mismatched keys."""
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    return model.eval()


def quantized_modules(model) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def assert_same_state(a, b):
    """Same keys, and every tensor equal bit for bit (dtype included)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_quantize_while_loading_equals_qcompile_quantize(float_dirs, kind, ids, tmp_path):
    quantized = load(float_dirs[kind], quantization_config=QCompileConfig(recipe=RECIPE))
    reference = qcompile.quantize(load(float_dirs[kind]), RECIPE, progress_bar=False)

    modules = quantized_modules(quantized)
    assert sorted(modules) == sorted(f"model.layers.{i}.{p}" for i in range(LAYERS) for p in PROJECTIONS)
    for name, module in modules.items():
        assert module.scheme == ("int8" if name.endswith("down_proj") else "int4-g128"), name
        assert not hasattr(module, "weight"), f"{name} kept its float weight"
    assert type(quantized.lm_head) is torch.nn.Linear  # the head stays float, as qcompile.quantize keeps it
    assert_same_state(quantized, reference)
    assert torch.equal(logits(quantized, ids), logits(reference, ids))
    plan = quantized.config.quantization_config.plan
    assert plan == {name: {"scheme": m.scheme, "in_features": m.in_features, "out_features": m.out_features}
                    for name, m in modules.items()}  # fmt: skip

    quantized.save_pretrained(tmp_path, max_shard_size="40KB")  # several shards: the checks read them all
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    loaded = load(tmp_path)
    assert_same_state(loaded, quantized)
    assert torch.equal(logits(loaded, ids), logits(quantized, ids))


def test_gpt2_conv1d_layers_transposed_weights(tmp_path):
    """GPT-2's ``Conv1D`` stores ``W`` as ``[K, N]``: quantized while loading as ``qcompile.quantize`` does, then
    round-tripped."""
    from qcompile.models import tiny_gpt2

    tiny_gpt2().save_pretrained(tmp_path / "float")
    quantized = load(tmp_path / "float", quantization_config=QCompileConfig(recipe="int4-g32"))
    reference = qcompile.quantize(load(tmp_path / "float"), "int4-g32", progress_bar=False)
    assert len(quantized_modules(quantized)) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj per block
    assert_same_state(quantized, reference)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    assert torch.equal(logits(quantized, ids), logits(reference, ids))
    quantized.save_pretrained(tmp_path / "quantized")
    loaded = load(tmp_path / "quantized")
    assert_same_state(loaded, quantized)
    assert torch.equal(logits(loaded, ids), logits(quantized, ids))


def test_each_weight_is_quantized_as_it_loads(float_dirs, monkeypatch):
    """While a weight is quantized, no other planned layer holds a float weight (peak memory: one float weight)."""
    from qcompile.hf.loading import QuantizeOnLoad

    seen, convert = [], QuantizeOnLoad.convert

    def watched(self, input_dict, **kwargs):
        model = kwargs["model"]
        floats = [name for name, m in quantized_modules(model).items()
                  if getattr(m, "weight", None) is not None and m.weight.device.type != "meta"]  # fmt: skip
        assert not floats, f"float weights held while loading: {floats}"
        seen.extend(input_dict)
        return convert(self, input_dict, **kwargs)

    monkeypatch.setattr(QuantizeOnLoad, "convert", watched)
    model = load(float_dirs["llama"], quantization_config=QCompileConfig(recipe="int8"))
    assert sorted(seen) == sorted(f"{name}.weight" for name in quantized_modules(model))


def test_release_file_pages_drops_only_pages_of_a_mapped_checkpoint(tmp_path):
    """The consumed float weight's pages leave the process and read back unchanged from the file; a tensor in
    ordinary memory is never touched."""
    import safetensors.torch
    from safetensors import safe_open

    from qcompile.hf import memory

    weight = torch.randn(300, 1000)
    safetensors.torch.save_file({"w": weight}, tmp_path / "w.safetensors")
    with safe_open(tmp_path / "w.safetensors", framework="pt") as handle:
        mapped = handle.get_slice("w")[...]
        released = memory.release_file_pages(mapped)
        if memory._LIBC is not None:
            assert weight.nbytes - 2 * 4096 <= released <= weight.nbytes
        assert torch.equal(mapped, weight)
    ordinary = weight.clone()
    assert memory.release_file_pages(ordinary) == 0 and torch.equal(ordinary, weight)


@pytest.mark.parametrize("scheme", EXAMPLES)
def test_save_load_round_trip_is_bit_exact(float_dirs, scheme, ids, tmp_path):
    quantized = load(float_dirs["llama"], quantization_config=QCompileConfig(recipe=scheme))
    assert {m.scheme for m in quantized_modules(quantized).values()} == {qcompile.parse_scheme(scheme).name}
    quantized.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "qcompile" and len(saved["plan"]) == LAYERS * len(PROJECTIONS)

    loaded = load(tmp_path)
    assert sorted(quantized_modules(loaded)) == sorted(quantized_modules(quantized))
    assert_same_state(loaded, quantized)
    assert torch.equal(logits(loaded, ids), logits(quantized, ids))
    assert loaded.config.quantization_config == quantized.config.quantization_config


@pytest.fixture(scope="module")
def saved_dir(float_dirs, tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-int4")
    load(float_dirs["llama"], quantization_config=QCompileConfig(recipe=RECIPE)).save_pretrained(path)
    return path


SITE = "model.layers.1.mlp.up_proj"  # int4-g128, N=96, K=64: scales float32 [96, 1]


@pytest.mark.parametrize("forgery, message", [
    ("shape", re.escape(f"{SITE}: int4-g128: scales is float32[96, 2], expected float32[96, 1]")),
    ("dtype", re.escape(f"{SITE}: int4-g128: scales is float16[96, 1], expected float32[96, 1]")),
    ("missing", re.escape(f"{SITE}.scales is missing")),
])  # fmt: skip
def test_forged_checkpoint_fails_naming_the_tensor(saved_dir, tmp_path, forgery, message):
    import safetensors.torch

    forged = tmp_path / "forged"
    shutil.copytree(saved_dir, forged)
    tensors = safetensors.torch.load_file(forged / "model.safetensors")
    key = f"{SITE}.scales"
    if forgery == "shape":
        tensors[key] = torch.cat([tensors[key], tensors[key]], dim=1)
    elif forgery == "dtype":
        tensors[key] = tensors[key].half()
    else:
        del tensors[key]
    safetensors.torch.save_file(tensors, forged / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(forged)


def test_generate_equals_greedy_decoding_by_hand(saved_dir):
    model = load(saved_dir)
    prompt = torch.tensor([[5, 17, 99, 3, 250]])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                         pad_token_id=0)  # fmt: skip
    by_hand = prompt
    for _ in range(4):
        step = logits(model, by_hand)[:, -1].argmax(-1, keepdim=True)
        by_hand = torch.cat([by_hand, step], dim=1)
    assert torch.equal(out, by_hand)


def test_torch_compile_runs_the_loaded_kernels_and_quantizes_nothing_again(float_dirs, ids):
    """The loaded model's layers are ``qcompile::linear`` calls; the backend plans nothing new, and the layer the
    recipe kept float (``o_proj``) stays float."""
    from qcompile.backend import qcompile_backend

    recipe = {"default": "int8", "overrides": [{"targets": ["*.o_proj"], "scheme": "float"}]}
    model = load(float_dirs["llama"], quantization_config=QCompileConfig(recipe=recipe))
    graphs, plans = [], []

    def spy(gm, example_inputs):
        graphs.append(gm)
        run = qcompile_backend(gm, example_inputs)
        plans.append(run.qcompile_plan)
        return run

    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend=spy)
        expected = logits(model, ids)
        got = logits(compiled, ids)
    finally:
        torch._dynamo.reset()
    linear = (torch.ops.qcompile.linear, torch.ops.qcompile.linear.default)
    calls = sum(n.target in linear for gm in graphs for n in gm.graph.nodes)
    assert calls == LAYERS * (len(PROJECTIONS) - 1)
    planned_anew = [e.site.name for plan in plans for e in plan.quantized() if not getattr(e, "prequantized", False)]
    assert plans and not planned_anew
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_calibrated_recipe_loads_float_then_quantizes(float_dirs, ids, tmp_path):
    recipe = {"default": "int4-g32", "algorithm": "gptq"}
    calibration = [torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))]
    quantized = load(float_dirs["llama"], quantization_config=QCompileConfig(recipe=recipe, calibration=calibration))
    reference = qcompile.quantize(load(float_dirs["llama"]), recipe, calibration=calibration, progress_bar=False)
    assert len(quantized_modules(quantized)) == LAYERS * len(PROJECTIONS)
    assert_same_state(quantized, reference)
    quantized.save_pretrained(tmp_path)
    assert "calibration" not in json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    loaded = load(tmp_path)
    assert_same_state(loaded, quantized)
    assert torch.equal(logits(loaded, ids), logits(quantized, ids))


def test_dequantize_gives_float_linears_of_the_dequantized_weights(saved_dir, ids):
    model = load(saved_dir)
    weights = {name: m.dequantized_weight() for name, m in quantized_modules(model).items()}
    before = logits(model, ids)
    model.dequantize()
    assert not quantized_modules(model) and not hasattr(model.config, "quantization_config")
    for name, weight in weights.items():
        linear = model.get_submodule(name)
        assert type(linear) is torch.nn.Linear and torch.equal(linear.weight, weight), name
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("config, message", [
    (lambda: QCompileConfig(recipe="int8", calibration=[torch.zeros(1, 4, dtype=torch.long)]),
     "calibration= is only read by gptq, awq and smoothquant"),
    (lambda: QCompileConfig(recipe={"default": "int4", "algorithm": "awq"}), "uses awq, which needs calibration"),
    (lambda: QCompileConfig(recipe={"default": "int8", "overrides": [{"targets": ["lm_head"], "scheme": "int8"}]}),
     "quantizes lm_head, whose weight is tied"),
    (lambda: QCompileConfig(recipe={"default": "int8", "overrides": [{"targets": ["*.nope"], "scheme": "int8"}]}),
     "matches no matmul site"),
    (lambda: QCompileConfig(recipe="int8", plan={}), "plan is written by qcompile"),
])  # fmt: skip
def test_refuses_what_makes_no_sense_before_loading(float_dirs, monkeypatch, config, message):
    from qcompile.hf.loading import QuantizeOnLoad

    monkeypatch.setattr(QuantizeOnLoad, "convert", lambda *a, **k: pytest.fail("a weight was read"))
    with pytest.raises(ValueError, match=re.escape(message)):
        AutoModelForCausalLM.from_pretrained(float_dirs["llama"], quantization_config=config())


def test_config_is_json_and_from_dict_takes_every_saved_key():
    config = QCompileConfig(recipe=RECIPE, calibration=[torch.zeros(1, 4, dtype=torch.long)])
    saved = json.loads(json.dumps(config.to_dict()))
    assert sorted(saved) == ["format_version", "plan", "quant_method", "recipe"]
    again = AutoQuantizationConfig.from_dict(saved)
    assert type(again) is QCompileConfig and again == config and again.calibration is None
    assert qcompile.load_recipe(again.recipe) == qcompile.load_recipe(RECIPE)
    assert QCompileConfig(recipe="int4-g128").to_dict()["recipe"] == "int4-g128"  # a scheme name stays a name
    with pytest.raises(TypeError, match="Did you mean 'recipe'"):
        QCompileConfig(recipie="int8")
    with pytest.raises(ValueError, match="QCompileConfig.recipe"):
        QCompileConfig(recipe="int5")
    with pytest.raises(ValueError, match=re.escape("plan['a'].scheme")):
        QCompileConfig.from_dict({**saved, "plan": {"a": {"scheme": "int5", "in_features": 1, "out_features": 1}}})


def test_import_qcompile_alone_loads_a_saved_checkpoint(saved_dir):
    """``import qcompile`` does not import transformers, yet registers the plug-in once transformers is imported:
    a saved checkpoint then loads with no other qcompile import."""
    code = ("import sys, qcompile; assert 'transformers' not in sys.modules; "
            "from transformers import AutoModelForCausalLM; "
            f"model = AutoModelForCausalLM.from_pretrained({str(saved_dir)!r}); "
            "print(type(model.model.layers[0].mlp.down_proj).__name__, model.model.layers[0].mlp.down_proj.scheme)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["QuantizedLinear", "int8"]
