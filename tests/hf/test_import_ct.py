"""compressed-tensors import: layers produced by compressed-tensors itself (its ``calculate_qparams`` and the
compressor of each format), imported and compared with the same package's ``decompress`` bit for bit — pack-quantized
int2/3/4/8 (group, channel, tensor; symmetric and asymmetric; bf16 and fp32 scales), int-quantized W8A8,
float-quantized FP8 (channel, tensor, 128 x 128 blocks on a ragged shape), NVFP4 and MXFP4. A tiny Llama checkpoint
with three config groups (regex targets, ``ignore``) loads to the logits of the float model with the package's
dequantized weights; unsupported formats, strategies and mismatched tensors are refused by name."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("compressed_tensors")

from import_writers import ct_args, ct_config, ct_layer, logits, tiny_llama, write_checkpoint  # noqa: E402
from qcompile.hf.checkpoints import CheckpointError, compressed_tensors, load  # noqa: E402

N, K = 72, 192
INT8_TOKEN = dict(num_bits=8, type="int", strategy="token", symmetric=True, dynamic=True)
FP8_TOKEN = dict(num_bits=8, type="float", strategy="token", symmetric=True, dynamic=True)
FP8_GROUP = dict(num_bits=8, type="float", strategy="group", group_size=128, symmetric=True, dynamic=True)


def _weight(seed=0, n=N, k=K):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def _group(weights, activations=None, fmt="pack-quantized"):
    return {"weights": weights.model_dump(), "input_activations": activations and activations.model_dump(),
            "format": fmt}  # fmt: skip


CASES = [
    # weights, activations, format, scale dtype, qcompile scheme
    (dict(num_bits=4, type="int", strategy="group", group_size=64, symmetric=False), None, "pack-quantized",
     torch.bfloat16, "int4-g64"),
    (dict(num_bits=4, type="int", strategy="group", group_size=32, symmetric=True), None, "pack-quantized",
     torch.float32, "int4-g32-sym"),
    (dict(num_bits=4, type="int", strategy="channel", symmetric=False), None, "pack-quantized", torch.float16, "int4"),
    (dict(num_bits=4, type="int", strategy="tensor", symmetric=True), None, "pack-quantized", torch.float32,
     "int4-sym"),
    (dict(num_bits=3, type="int", strategy="group", group_size=32, symmetric=True), None, "pack-quantized",
     torch.float32, "int3-g32-sym"),
    (dict(num_bits=2, type="int", strategy="group", group_size=64, symmetric=False), None, "pack-quantized",
     torch.bfloat16, "int2-g64"),
    (dict(num_bits=8, type="int", strategy="channel", symmetric=True), None, "pack-quantized", torch.bfloat16, "int8"),
    (dict(num_bits=8, type="int", strategy="group", group_size=64, symmetric=False), None, "pack-quantized",
     torch.float32, "int8-g64-asym"),
    (dict(num_bits=8, type="int", strategy="channel", symmetric=True), INT8_TOKEN, "int-quantized", torch.bfloat16,
     "w8a8"),
    (dict(num_bits=4, type="int", strategy="group", group_size=64, symmetric=True), INT8_TOKEN, "pack-quantized",
     torch.float32, "w4a8-g64-sym"),
    (dict(num_bits=8, type="float", strategy="channel", symmetric=True), FP8_TOKEN, "float-quantized", torch.bfloat16,
     "fp8-w8a8"),
    (dict(num_bits=8, type="float", strategy="tensor", symmetric=True), None, "naive-quantized", torch.float32, "fp8"),
    (dict(num_bits=8, type="float", strategy="block", block_structure=[128, 128], symmetric=True), FP8_GROUP,
     "float-quantized", torch.float32, "fp8-block"),
    (dict(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True,
          scale_dtype=torch.float8_e4m3fn), None, "nvfp4-pack-quantized", None, "nvfp4"),
    (dict(num_bits=4, type="float", strategy="group", group_size=32, symmetric=True, scale_dtype=torch.uint8), None,
     "mxfp4-pack-quantized", None, "mxfp4"),
]  # fmt: skip


@pytest.mark.parametrize("weights, activations, fmt, scale_dtype, scheme", CASES, ids=[c[-1] for c in CASES])
def test_dequantized_weight_equals_compressed_tensors(weights, activations, fmt, scale_dtype, scheme):
    weights = ct_args(**weights)
    activations = activations and ct_args(**activations)
    tensors, theirs = ct_layer(_weight(seed=len(scheme)), weights, activations, fmt, scale_dtype)
    layer = compressed_tensors.convert(tensors, _group(weights, activations, fmt), in_features=K, out_features=N,
                                       where="l")  # fmt: skip
    assert layer.scheme == scheme
    ours = layer.dequantized_weight()
    assert torch.equal(ours.to(theirs.dtype), theirs), (ours.to(theirs.dtype) - theirs).abs().max()
    if theirs.dtype == torch.float32:
        assert torch.equal(ours, theirs)
    if scheme == "nvfp4":  # the unit is a product here, a division there: float32 values within 2 ulp
        _, theirs32 = ct_layer(_weight(seed=len(scheme)), weights, activations, fmt, scale_dtype, fp32=True)
        torch.testing.assert_close(ours, theirs32, rtol=2.4e-7, atol=0)
    else:
        assert layer.notes == ()


def test_w8a8_and_fp8_activations_follow_the_published_per_token_rules():
    """int8: x_scale = absmax / 127 (fp32), codes clamp(round(x / x_scale), -127, 127); fp8: absmax / 448, e4m3."""
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(4))
    cases = [(CASES[8][0], INT8_TOKEN, "int-quantized", torch.int8),
             (CASES[10][0], FP8_TOKEN, "float-quantized", torch.float8_e4m3fn)]
    for weights, activations, fmt, dtype in cases:
        weights, activations = ct_args(**weights), ct_args(**activations)
        tensors, w = ct_layer(_weight(seed=9), weights, activations, fmt, torch.float32)
        layer = compressed_tensors.convert(tensors, _group(weights, activations, fmt), where="l")
        amax = x.abs().amax(-1, keepdim=True)
        if dtype == torch.int8:
            scale = amax / 127
            xq = torch.clamp(torch.round(x / scale), -127, 127)
        else:
            scale = amax / 448
            xq = (x / scale).to(torch.float8_e4m3fn).float()
        expected = (xq.double() * scale.double()) @ w.double().t()
        torch.testing.assert_close(layer.module()(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_nvfp4_global_scale_makes_most_units_equal_compressed_tensors_division():
    weights = ct_args(**CASES[13][0])
    for magnitude in (1e-3, 0.3, 7.0, 123.0):
        tensors, _ = ct_layer(_weight(seed=int(magnitude * 10)) * magnitude, weights, None, "nvfp4-pack-quantized")
        scales, divisor = tensors["weight_scale"].float(), tensors["weight_global_scale"]
        multiplier, exact = compressed_tensors.nvfp4_multiplier(tensors["weight_scale"], divisor)
        same = scales * multiplier == scales / divisor
        base_same = scales * (1 / divisor) == scales / divisor
        assert exact == bool(same.all()) and same.sum() >= base_same.sum() and same.float().mean() > 0.5
        ulps = ((scales * multiplier).view(torch.int32) - (scales / divisor).view(torch.int32)).abs()
        assert int(ulps.max()) <= 1


def test_unsupported_and_mismatched_checkpoints_are_refused_by_name():
    weights = ct_args(**CASES[0][0])
    tensors, _ = ct_layer(_weight(), weights, None, "pack-quantized", torch.bfloat16)
    group = _group(weights)
    with pytest.raises(CheckpointError, match=r"attn: compressed-tensors format 'marlin-24' is not supported"):
        compressed_tensors.convert(tensors, {**group, "format": "marlin-24"}, where="attn")
    wrong_group = {**group, "weights": {**group["weights"], "group_size": 32}}
    with pytest.raises(CheckpointError, match=r"attn\.weight_scale: is bfloat16\[72, 3\], expected .*\[72, 6\] "
                                              r"\(group_size=32\)"):  # fmt: skip
        compressed_tensors.convert(tensors, wrong_group, where="attn")
    wrong_bits = {**group, "weights": {**group["weights"], "num_bits": 8}}
    with pytest.raises(CheckpointError, match=r"attn\.weight_packed: is int32\[72, 24\], expected int32\[72, 48\]"):
        compressed_tensors.convert(tensors, wrong_bits, where="attn")
    with pytest.raises(CheckpointError, match=r"attn\.weight_shape: is \[72, 192\], the layer is \[72, 128\]"):
        compressed_tensors.convert(tensors, group, in_features=128, where="attn")
    with pytest.raises(CheckpointError, match=r"attn\.input_scale: static activation quantization is not supported"):
        compressed_tensors.convert({**tensors, "input_scale": torch.ones(1)}, group, where="attn")
    fp8_act = {**group, "input_activations": FP8_TOKEN}
    with pytest.raises(CheckpointError, match=r"attn: input activations .* with int4 weights are not supported"):
        compressed_tensors.convert(tensors, fp8_act, where="attn")
    with pytest.raises(CheckpointError, match=r"quantization_status 'frozen'"):
        compressed_tensors.layers([], {"config_groups": {"g": group}, "quantization_status": "frozen"}, {})
    with pytest.raises(CheckpointError, match=r"kv_cache_scheme is not supported"):
        compressed_tensors.layers([], {"config_groups": {"g": group}, "kv_cache_scheme": {"num_bits": 8}}, {})


def test_tiny_llama_with_three_config_groups_gives_the_dequantized_float_models_logits(tmp_path):
    from compressed_tensors.quantization import QuantizationScheme

    int4 = ct_args(**CASES[0][0])
    nvfp4 = ct_args(**CASES[13][0])
    mxfp4 = ct_args(**CASES[14][0])
    groups = {
        "group_0": QuantizationScheme(targets=[r"re:.*self_attn\.(q|k|v|o)_proj$"], weights=int4,
                                      format="pack-quantized"),
        "group_1": QuantizationScheme(targets=[r"re:.*mlp\.(gate|up)_proj$"], weights=nvfp4,
                                      format="nvfp4-pack-quantized"),
        "group_2": QuantizationScheme(targets=["Linear"], weights=mxfp4, format="mxfp4-pack-quantized"),
    }  # fmt: skip
    config = ct_config(groups, ignore=["lm_head"], fmt="mixed-precision")

    def layer(name, weight):
        if "self_attn" in name:
            return ct_layer(weight, int4, None, "pack-quantized", torch.float32)
        if "down_proj" in name:
            return ct_layer(weight, mxfp4, None, "mxfp4-pack-quantized", fp32=True)
        return ct_layer(weight, nvfp4, None, "nvfp4-pack-quantized", fp32=True)

    reference = write_checkpoint(tiny_llama(seed=3), tmp_path, config, layer)
    loaded = load(tmp_path, dtype=torch.float32)
    schemes = dict((name, scheme) for name, scheme, _ in loaded.qcompile_import)
    assert schemes["model.layers.0.self_attn.k_proj"] == "int4-g64"
    assert schemes["model.layers.1.mlp.up_proj"] == "nvfp4" and schemes["model.layers.1.mlp.down_proj"] == "mxfp4"
    assert len(schemes) == 14 and type(loaded.lm_head) is torch.nn.Linear  # ignored
    torch.testing.assert_close(logits(loaded), logits(reference), rtol=1e-4, atol=1e-4)
