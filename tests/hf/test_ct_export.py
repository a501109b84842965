"""compressed-tensors export: a tiny Llama quantized by qcompile (one scheme per site: integer group/channel,
symmetric/asymmetric, w8a8, fp8, fp8-w8a8, fp8-block, nvfp4, mxfp4) is saved, its config validated by
compressed-tensors' own ``QuantizationConfig``, each layer decompressed by compressed-tensors' own compressor and
compared with qcompile's dequantized weight (bit for bit when exact, to the reported error when re-rounded);
transformers' compressed-tensors loader gives qcompile's logits; an imported checkpoint exports back to the same
tensors; sites without a compressed-tensors form are refused by name."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("compressed_tensors")

import qcompile  # noqa: E402
from import_writers import ct_args, ct_config, ct_layer, gptq_layer, logits, tiny_llama, write_checkpoint  # noqa: E402
from qcompile.hf.checkpoints import gptq, load  # noqa: E402
from qcompile.hf.compressed_tensors_export import ExportError, save  # noqa: E402
from qcompile.nn import QuantizedLinear  # noqa: E402

SITES = [f"model.layers.{i}.{p}" for i in range(2) for p in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj")]  # fmt: skip
EVERY_SCHEME = ["int4-g64", "int4-g32-sym", "int8", "int8-g64-asym", "nvfp4", "mxfp4", "fp8",
                "w8a8", "fp8-w8a8", "fp8-block", "int4", "int2-g64", "int4-g128-sym", "int4-g64-sym"]  # fmt: skip
RE_ROUNDED = {"int4-g64", "int8-g64-asym", "int4", "int2-g64"}  # asymmetric RTN: float zeros


def _recipe(schemes):
    return {"default": None, "overrides": [{"targets": [s], "scheme": n} for s, n in zip(SITES, schemes) if n]}


def _read(path):
    from safetensors.torch import load_file

    return json.loads((path / "config.json").read_text())["quantization_config"], load_file(path / "model.safetensors")


def _peer_weights(path, float_model):
    """compressed-tensors' own view: its config model, its target matching, its compressors' decompress."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import is_match

    qconfig, tensors = _read(path)
    config = QuantizationConfig.model_validate(qconfig)
    out = {}
    for name, module in float_model.named_modules():
        for group in config.config_groups.values():
            if is_match(name, module, group.targets, config.ignore):
                local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")
                         and "." not in k[len(name) + 1:]}  # fmt: skip
                compressor = BaseCompressor.get_value_from_registry(group.format or config.format)
                out[name] = (compressor.decompress(local, group)["weight"], group)
    return config, out


def test_every_scheme_decompresses_to_qcompiles_weights(tmp_path, capsys):
    model = tiny_llama(seed=4)
    float_model = copy.deepcopy(model)
    qcompile.quantize(model, _recipe(EVERY_SCHEME), progress_bar=False)
    records = save(model, tmp_path)
    printed = capsys.readouterr().out
    assert "max abs added error" in printed and "model.layers.0.self_attn.q_proj  int4-g64" in printed
    config, peer = _peer_weights(tmp_path, float_model)
    assert config.format == "mixed-precision" and config.ignore == ["lm_head"]
    assert set(peer) == set(SITES)
    by_site = {r.site: r for r in records}
    for site, scheme in zip(SITES, EVERY_SCHEME):
        record, (theirs, group) = by_site[site], peer[site]
        ours = model.get_submodule(site).dequantized_weight()
        assert record.scheme == scheme
        if scheme in RE_ROUNDED:
            assert record.status == "re-rounded" and record.max_error > 0
            scales = model.get_submodule(site).scales
            assert record.max_error <= 0.5 * float(scales.max()) * 1.0001
            assert float((theirs.float() - ours).abs().max()) == pytest.approx(record.max_error, rel=0, abs=0)
        elif scheme == "nvfp4":  # its decompressor rounds to bfloat16; units within a float32 ulp
            assert record.status in ("exact", "unit-ulp")
            assert torch.equal(ours.to(theirs.dtype), theirs)
        else:
            assert record.status == "exact" and record.max_error == 0
            assert torch.equal(ours.to(theirs.dtype), theirs), site
            assert theirs.dtype == torch.bfloat16 or torch.equal(theirs, ours), site
    assert peer["model.layers.1.self_attn.q_proj"][1].input_activations.strategy == "token"
    assert peer["model.layers.1.self_attn.v_proj"][1].weights.block_structure == [128, 128]


def _transformers_model(path, dequantize=False):
    """transformers 5 + compressed-tensors 0.20 on CPU. ``dequantize=False`` decompresses on the first forward but
    cannot load asymmetric pack-quantized zero points (its meta-device layout leaves them unpacked, [N, G]);
    ``dequantize=True`` loads them but decompresses every dense layer with the first config group's scheme, so it
    serves single-group checkpoints only."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    config = CompressedTensorsConfig(dequantize=dequantize)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)


def test_transformers_loads_the_export_with_qcompiles_logits(tmp_path):
    """Several config groups (``dequantize=False``); fp8-w8a8 and fp8-block activations are fake-quantized by
    compressed-tensors with the same per-token / per-group rule as qcompile."""
    schemes = ["int4-g64-sym", "int8", "fp8-w8a8", "fp8-block", "int4-sym", "int8-g32", "int4-g64-sym"] * 2
    model = tiny_llama(seed=5)
    qcompile.quantize(model, _recipe(schemes), progress_bar=False)
    records = save(model, tmp_path, verbose=False)
    assert {r.status for r in records} == {"exact"}
    torch.testing.assert_close(logits(_transformers_model(tmp_path)), logits(model), rtol=1e-5, atol=1e-5)


def test_fp4_exports_load_in_transformers(tmp_path):
    """compressed-tensors decompresses FP4 to bfloat16 whatever the model dtype: the weights transformers ends up
    with are qcompile's rounded to bfloat16 (exact for mxfp4, whose values are bfloat16 numbers)."""
    model = tiny_llama(seed=6)
    qcompile.quantize(model, _recipe(["mxfp4", "nvfp4", "mxfp4", "nvfp4", "mxfp4", "nvfp4", "mxfp4"] * 2),
                      progress_bar=False)  # fmt: skip
    save(model, tmp_path, verbose=False)
    hf = _transformers_model(tmp_path)
    hf.hf_quantizer.compressor.decompress_model(hf)
    for site in SITES:
        theirs = hf.get_submodule(site).weight
        ours = model.get_submodule(site).dequantized_weight()
        assert theirs.dtype == torch.bfloat16 and torch.equal(ours.to(torch.bfloat16), theirs)
        if model.get_submodule(site).scheme == "mxfp4":
            assert torch.equal(theirs.float(), ours)
        hf.get_submodule(site).weight.data = theirs.data.float()
    torch.testing.assert_close(logits(hf), logits(model), rtol=0, atol=3e-3)


def test_imported_checkpoints_export_exactly(tmp_path):
    """Integer zero points are exact: a GPTQ import (asymmetric int4-g64) exports to the same weights and
    transformers gives its logits; a compressed-tensors import exports back to the same codes and zero points."""
    config = {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": False, "checkpoint_format": "gptq_v2"}
    write_checkpoint(tiny_llama(seed=7), tmp_path / "gptq", config, lambda n, w: gptq_layer(w, 4, 64, v2=True))
    imported = load(tmp_path / "gptq", dtype=torch.float32)
    records = save(imported, tmp_path / "out", verbose=False)
    assert {(r.scheme, r.status) for r in records} == {("int4-g64", "exact")}
    theirs = _transformers_model(tmp_path / "out", dequantize=True)  # one config group
    torch.testing.assert_close(logits(theirs), logits(imported), rtol=1e-5, atol=1e-5)

    int4 = ct_args(num_bits=4, type="int", strategy="group", group_size=64, symmetric=False)
    from compressed_tensors.quantization import QuantizationScheme

    group = QuantizationScheme(targets=["Linear"], weights=int4, format="pack-quantized")
    ct = ct_config({"group_0": group}, fmt="pack-quantized")
    write_checkpoint(tiny_llama(seed=8), tmp_path / "ct", ct, lambda n, w: ct_layer(w, int4, None, "pack-quantized",
                                                                                   torch.float32))  # fmt: skip
    save(load(tmp_path / "ct", dtype=torch.float32), tmp_path / "ct_out", verbose=False)
    (before_config, before), (after_config, after) = _read(tmp_path / "ct"), _read(tmp_path / "ct_out")
    assert after_config["config_groups"]["group_0"]["weights"] == before_config["config_groups"]["group_0"]["weights"]
    for name in before:
        assert torch.equal(after[name], before[name]), name


def test_sites_without_a_compressed_tensors_form_are_refused_by_name(tmp_path):
    schemes = ["int3-g32", "nf4-g64", "mxfp4-had", "fp8-block-ue8m0", "w4a8-g64", "nvfp4-w4a4", "int4-g128"]
    model = tiny_llama(seed=9)
    qcompile.quantize(model, _recipe(schemes), progress_bar=False)
    permuted = model.model.layers[1].self_attn.q_proj  # a GPTQ desc_act import: an input permutation
    tensors, _ = gptq_layer(permuted.weight.detach(), 4, 64, desc_act=True)
    gptq_config = {"bits": 4, "group_size": 64, "sym": False, "checkpoint_format": "gptq"}
    model.model.layers[1].self_attn.q_proj = gptq.convert(tensors, gptq_config).module()
    with pytest.raises(ExportError) as error:
        save(model, tmp_path, verbose=False)
    message = str(error.value)
    for line in ["q_proj (int3-g32): 3-bit integers", "k_proj (nf4-g64): family nf4 has no compressed-tensors form",
                 "v_proj (mxfp4-had): Hadamard rotations", "o_proj (fp8-block-ue8m0): ue8m0",
                 "gate_proj (w4a8-g64): family w4a8-int",
                 "up_proj (nvfp4-w4a4): Hadamard rotations and FP4 activation",
                 "down_proj (int4-g128): K=192 is not a multiple of the group size 128",
                 "layers.1.self_attn.q_proj (int4-g64): an input permutation (desc_act)"]:  # fmt: skip
        assert line in message, line
    assert not (tmp_path / "model.safetensors").exists()
    assert all(isinstance(model.get_submodule(s), QuantizedLinear) for s in SITES[:7])
