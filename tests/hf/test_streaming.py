"""Streaming quantization of a checkpoint (``qcompile.hf.streaming.quantize_checkpoint``): one tensor or one decoder
block at a time, output shards written as it goes.

The references are the in-memory paths on the same sharded float checkpoint (a tiny random Llama in bfloat16, tied
embedding, K=96 ragged against group 128; a tiny GPT-2 for transposed ``Conv1D`` weights): the transformers plug-in
(``from_pretrained(quantization_config=QCompileConfig(recipe))`` then ``save_pretrained``) for ``format="hf"``;
``qcompile.quantize`` then ``compressed_tensors_export.save`` for ``format="compressed-tensors"``;
``qcompile.quantize`` with calibration on the whole model for GPTQ and AWQ. Every tensor must be equal, dtype
included. Peak memory is measured in a fresh process (``VmHWM`` after resetting it, Linux) on a 98 MiB checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import qcompile

transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from qcompile.hf import QCompileConfig  # noqa: E402
from qcompile.hf.compressed_tensors_export import ExportError, save  # noqa: E402
from qcompile.hf.streaming import quantize_checkpoint  # noqa: E402
from qcompile.hf.streaming_writer import INDEX_NAME, ShardWriter  # noqa: E402

VOCAB = 256
RECIPE = {"default": "int4-g128", "overrides": [{"targets": ["*.down_proj"], "scheme": "int8"}]}
SIDE_FILES = {"tokenizer_config.json": '{"model_max_length": 128}\n', "special_tokens_map.json": "{}\n",
              "chat_template.jinja": "{{ messages }}\n"}  # fmt: skip


def _write_float(model, path: pathlib.Path) -> str:
    model.save_pretrained(path, max_shard_size="40KB")  # several shards and an index
    for name, text in SIDE_FILES.items():
        (path / name).write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return _write_float(model, tmp_path_factory.mktemp("llama-float"))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from qcompile.models import tiny_gpt2

    return _write_float(tiny_gpt2(), tmp_path_factory.mktemp("gpt2-float"))


@pytest.fixture(scope="module")
def ids():
    return [torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]


def read_tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(pathlib.Path(path).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_same_tensors(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def load(path, **kwargs):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def logits(model, seed: int = 3):
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_rtn_hf_format_equals_the_plugins_save_pretrained(kind, llama_dir, gpt2_dir, tmp_path):
    source = {"llama": llama_dir, "gpt2": gpt2_dir}[kind]
    recipe = RECIPE if kind == "llama" else "int4-g32"
    report = quantize_checkpoint(source, tmp_path / "streamed", recipe, max_shard_bytes=20_000, progress=False)
    plugin = load(source, quantization_config=QCompileConfig(recipe=recipe))
    plugin.save_pretrained(tmp_path / "plugin")

    streamed = tmp_path / "streamed"
    assert_same_tensors(read_tensors(streamed), read_tensors(tmp_path / "plugin"))
    config = json.loads((streamed / "config.json").read_text())
    assert config == json.loads((tmp_path / "plugin/config.json").read_text())
    index = json.loads((streamed / INDEX_NAME).read_text())
    shards = sorted(p.name for p in streamed.glob("*.safetensors"))
    assert len(shards) == len(report.files) > 1 and sorted(set(index["weight_map"].values())) == shards
    for name in shards:  # every shard holds what the index says, each tensor aligned to its element size
        with safe_open(streamed / name, framework="pt") as handle:
            assert sorted(handle.keys()) == sorted(k for k, v in index["weight_map"].items() if v == name)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in read_tensors(streamed).values())
    for name, text in SIDE_FILES.items():
        assert (streamed / name).read_text() == text
    assert (streamed / "generation_config.json").is_file() and not report.dropped
    assert len(report.plan.to_quantize()) == len(report.plan.quantized()) > 0

    loaded = load(streamed)  # `import qcompile` is all it takes
    assert torch.equal(logits(loaded), logits(plugin))


def test_compressed_tensors_format_equals_export_save(llama_dir, tmp_path):
    recipe = {"default": "int4-g32-sym", "overrides": [{"targets": ["*.down_proj"], "scheme": "int8"},
                                                       {"targets": ["*.q_proj"], "scheme": "fp8"}]}  # fmt: skip
    report = quantize_checkpoint(llama_dir, tmp_path / "streamed", recipe, format="compressed-tensors",
                                 max_shard_bytes=30_000, progress=False)  # fmt: skip
    model = qcompile.quantize(load(llama_dir), recipe, progress_bar=False)
    records = save(model, tmp_path / "saved", verbose=False)

    assert len(report.files) > 1
    assert_same_tensors(read_tensors(tmp_path / "streamed"), read_tensors(tmp_path / "saved"))
    config = json.loads((tmp_path / "streamed/config.json").read_text())
    assert config == json.loads((tmp_path / "saved/config.json").read_text())
    assert report.records == records
    from compressed_tensors.quantization import QuantizationConfig

    assert QuantizationConfig.model_validate(config["quantization_config"]).format == "mixed-precision"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", dtype=torch.float32,
                                              quantization_config=transformers.CompressedTensorsConfig())  # fmt: skip
    for module in model.modules():  # float32 embedding and norms; the packed tensors stay as they are
        for name, param in module.named_parameters(recurse=False):
            setattr(module, name, torch.nn.Parameter(param.detach().float(), requires_grad=False))
    torch.testing.assert_close(logits(hf), logits(model), rtol=1e-5, atol=1e-5)


CALIBRATED = {
    "gptq": {"default": "int4-g32", "algorithm": "gptq",
             "overrides": [{"targets": ["*.down_proj"], "scheme": "int8", "algorithm": "rtn"}]},
    "awq": {"default": "int4-g32", "algorithm": "awq", "options": {"grid": 5}},
    "gptq-layer-0": {"default": "int4-g32", "overrides": [{"targets": ["model.layers.0"], "algorithm": "gptq",
                                                            "scheme": "int8-g32"}]},
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CALIBRATED))
def test_calibrated_block_by_block_equals_quantize_of_the_whole_model(case, llama_dir, ids, tmp_path):
    """Same steps on the same inputs in the same order, so the same codes, bit for bit (AWQ's scales folded into
    the norms included; with GPTQ on layer 0 only, layer 1 is quantized a tensor at a time)."""
    recipe, algorithm = CALIBRATED[case], "awq" if case == "awq" else "gptq"
    with pytest.warns(UserWarning, match="unscaled") if algorithm == "awq" else contextlib.nullcontext():
        report = quantize_checkpoint(llama_dir, tmp_path, recipe, calibration=ids, max_shard_bytes=30_000,
                                     progress=False)  # fmt: skip
    model = qcompile.quantize(load(llama_dir), recipe, calibration=ids, progress_bar=False)
    want = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: written once
    assert_same_tensors(read_tensors(tmp_path), want)
    if algorithm == "awq":  # the folded scales reached the norms that were written
        source = read_tensors(llama_dir)
        assert not torch.equal(want["model.layers.0.input_layernorm.weight"],
                               source["model.layers.0.input_layernorm.weight"])  # fmt: skip
        assert report.unscaled and all("o_proj" in line for line in report.unscaled)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["plan"] == {e.site.name: {"scheme": e.scheme, "in_features": e.site.in_features,
                                           "out_features": e.site.out_features} for e in report.plan.quantized()}


def test_refusals_name_what_and_where_before_writing(llama_dir, ids, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"layers\.0\.self_attn\.q_proj \(int3-g32\): 3-bit integers"):
        quantize_checkpoint(llama_dir, out, "int3-g32", format="compressed-tensors", progress=False)
    assert not out.exists() or not list(out.iterdir())
    with pytest.raises(ValueError, match="calibration= is only read by gptq, awq and smoothquant"):
        quantize_checkpoint(llama_dir, out, "int4-g128", calibration=ids, progress=False)
    with pytest.raises(ValueError, match="lm_head, whose weight is tied"):
        quantize_checkpoint(llama_dir, out, {"default": "int8", "default_includes_head": True}, progress=False)
    with pytest.raises(ValueError, match="format must be one of hf, compressed-tensors, got 'gguf'"):
        quantize_checkpoint(llama_dir, out, "int8", format="gguf", progress=False)
    with pytest.raises(ValueError, match="output directory is the source"):
        quantize_checkpoint(llama_dir, llama_dir, "int8", progress=False)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        quantize_checkpoint(tmp_path, out, "int8", progress=False)


def test_gptq_outside_the_blocks_and_missing_tensors_are_refused(gpt2_dir, llama_dir, ids, tmp_path):
    untied = tmp_path / "untied"
    config = transformers.AutoConfig.from_pretrained(llama_dir)
    config.tie_word_embeddings = False
    tensors = read_tensors(llama_dir)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    untied.mkdir()
    config.save_pretrained(untied)
    save_file(tensors, untied / "model.safetensors")
    head = {"default": "int4-g32", "algorithm": "gptq", "overrides": [{"targets": ["lm_head"], "scheme": "int8"}]}
    with pytest.raises(ValueError, match=r"lm_head: gptq outside the decoder blocks \(model\.layers\.\*\)"):
        quantize_checkpoint(untied, tmp_path / "out", head, calibration=ids, progress=False)

    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, untied / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks model\.layers\.1\.mlp\.up_proj\.weight, which LlamaForCausalLM"):
        quantize_checkpoint(untied, tmp_path / "out", "int8", progress=False)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(96, 65, dtype=torch.bfloat16)
    save_file(tensors, untied / "model.safetensors")
    with pytest.raises(ValueError, match=r"up_proj\.weight is BF16\[96, 65\].*expects \[96, 64\]"):
        quantize_checkpoint(untied, tmp_path / "out", "int8", progress=False)


def test_shard_writer_splits_aligns_and_replaces_an_earlier_save(tmp_path):
    (tmp_path / "model-00001-of-00009.safetensors").write_bytes(b"stale")
    tensors = {"a.bias": torch.arange(3, dtype=torch.bfloat16), "a.qweight": torch.arange(10, dtype=torch.uint8),
               "a.scales": torch.rand(5, 3, dtype=torch.float64), "b.flag": torch.tensor([True, False]),
               "b.scale": torch.tensor(2.5), "b.empty": torch.zeros(0, 4)}  # fmt: skip
    writer = ShardWriter(tmp_path, max_shard_bytes=64)
    for key, tensor in tensors.items():
        writer.add(key, tensor)
    files = writer.close()
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]  # scales alone
    with safe_open(files[1], framework="pt") as handle:
        assert list(handle.keys()) == ["a.scales"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([INDEX_NAME, *[f.name for f in files]])
    assert_same_tensors(read_tensors(tmp_path), tensors)
    for file in files:  # save_file's order: element size descending, so every tensor starts aligned
        header = json.loads(file.read_bytes()[8 : 8 + int.from_bytes(file.read_bytes()[:8], "little")])
        for key, meta in header.items():
            if key != "__metadata__":
                assert meta["data_offsets"][0] % tensors[key].element_size() == 0, key
    writer = ShardWriter(tmp_path, max_shard_bytes=1 << 20)  # one shard now: the earlier ones and the index go
    writer.add("x", torch.ones(2))
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


_CHILD = r"""
import json, sys, torch
from qcompile.hf.streaming import quantize_checkpoint
from qcompile.hf.streaming_source import meta_model
from qcompile.plan import PlanEntry, Site
from qcompile.quantizer import quantize_entry

def rss(field):
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) * 1024 for l in status if l.startswith(field + ":"))

meta_model(sys.argv[1])  # imports and one small quantization, then the peak is reset to the current RSS
weight = torch.randn(64, 256)
quantize_entry(PlanEntry(Site.for_weight("w", "w.weight", weight), "int4-g128"), weight)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = rss("VmRSS")
report = quantize_checkpoint(sys.argv[1], sys.argv[2], "int4-g128", max_shard_bytes=16 << 20, progress=False)
print(json.dumps({"base": base, "peak": rss("VmHWM"), "read": report.bytes_read, "files": len(report.files)}))
"""


def _synthetic_llama(path: pathlib.Path, layers: int, hidden: int, intermediate: int, vocab: int) -> int:
    """A float bfloat16 Llama checkpoint, four layers per shard; weights are windows of one random vector (their
    values do not matter here, only their bytes). Returns the tensor bytes."""
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=layers, num_attention_heads=hidden // 64, head_dim=64,
                                      num_key_value_heads=2, tie_word_embeddings=False, dtype="bfloat16")  # fmt: skip
    config.save_pretrained(path)
    pool = (torch.randn(vocab * hidden + 4096, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)

    def weight(rows, cols, i):
        start = (i * 997) % 4096
        return pool[start : start + rows * cols].reshape(rows, cols).clone()

    shards, total, n = [{"model.embed_tokens.weight": weight(vocab, hidden, 0)}], 0, 1
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (128, hidden), "self_attn.v_proj":
              (128, hidden), "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (intermediate, hidden),
              "mlp.up_proj": (intermediate, hidden), "mlp.down_proj": (hidden, intermediate)}  # fmt: skip
    for layer in range(layers):
        if layer % 4 == 0:
            shards.append({})
        for name, (rows, cols) in shapes.items():
            shards[-1][f"model.layers.{layer}.{name}.weight"] = weight(rows, cols, n)
            n += 1
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shards[-1][f"model.layers.{layer}.{norm}.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    shards[-1].update({"model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                       "lm_head.weight": weight(vocab, hidden, n)})  # fmt: skip
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(t.nbytes for t in shard.values())
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset needs Linux /proc")
def test_peak_memory_stays_far_below_the_checkpoint(tmp_path):
    """8 layers (hidden 512, MLP 1024, vocab 32768 untied: 98 MiB of bfloat16, 4 shards): the process's resident set
    grows by one weight's quantization (its float32 copy and temporaries: ~15 MiB here), under a quarter of the
    checkpoint, though every page of it is read; holding the checkpoint, the output (~74 MiB), or one float
    embedding's pages whole (32 MiB; they are copied piece by piece) would show."""
    size = _synthetic_llama(tmp_path / "float", layers=8, hidden=512, intermediate=1024, vocab=32768)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "float"), str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    grown = result["peak"] - result["base"]
    assert result["read"] == size and result["files"] > 1
    assert 0 < grown < size / 4, f"peak RSS grew by {grown / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB checkpoint"
