"""``fp8-block`` and ``fp8-block-ue8m0`` against the published definition (DeepSeek-V3 / FINEGRAINED_FP8), written here
in float64 with its own e4m3 rounding, and against compressed-tensors' FP8_BLOCK quantizer."""

from __future__ import annotations

import math

import pytest
import torch

import qcompile  # noqa: F401  (registers torch.ops.qcompile.linear)
from qcompile.schemes import parse_scheme
from qcompile.schemes.fp8_block import FP8Block, quantize_activations

NAMES = ["fp8-block", "fp8-block-ue8m0"]
SHAPES = [(130, 200), (5, 70), (257, 384)]  # (N, K): ragged blocks both ways, one exactly 3 groups of K


def e4m3(v: torch.Tensor) -> torch.Tensor:
    """float64 ``|v| <= 448`` → the nearest float8 e4m3 value, ties to even: 3 mantissa bits above 2**-6, multiples
    of 2**-9 below."""
    a = v.abs()
    _, exponent = torch.frexp(a)  # a = m * 2**exponent, m in [0.5, 1)
    quantum = torch.pow(2.0, (exponent.to(torch.float64) - 1).clamp_min(-6) - 3)
    return torch.copysign(torch.round(a / quantum) * quantum, v)


def scale_of(amax: float, ue8m0: bool) -> float:
    """float32(amax / 448); ue8m0: the smallest power of two >= it; 1 for zero."""
    scale = float(torch.tensor(amax / 448.0, dtype=torch.float64).to(torch.float32))
    if scale == 0.0:
        return 1.0
    if ue8m0:
        mantissa, exponent = math.frexp(scale)
        scale = scale if mantissa == 0.5 else 2.0**exponent
    return scale


def quantize_block(block: torch.Tensor, scale: float) -> torch.Tensor:
    """float64 e4m3 values of ``e4m3(clamp(float32(block / scale)))``."""
    quotient = (block.to(torch.float64) / scale).to(torch.float32).to(torch.float64)
    return e4m3(quotient.clamp(-448.0, 448.0))


def expected_weight(w: torch.Tensor, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes as float64 [N, K], scales float64 [ceil(N/128), ceil(K/128)]) by looping over the blocks."""
    n, k = w.shape
    rows, cols = -(-n // 128), -(-k // 128)
    codes, scales = torch.zeros(n, k, dtype=torch.float64), torch.zeros(rows, cols, dtype=torch.float64)
    for i in range(rows):
        for j in range(cols):
            block = w[128 * i : 128 * (i + 1), 128 * j : 128 * (j + 1)]
            scales[i, j] = scale_of(block.abs().max().item(), ue8m0)
            codes[128 * i : 128 * (i + 1), 128 * j : 128 * (j + 1)] = quantize_block(block, scales[i, j].item())
    return codes, scales


def expected_activations(x: torch.Tensor, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes as float64 [M, K], scales float64 [M, ceil(K/128)]) per token and group of 128."""
    m, k = x.shape
    x = x.to(torch.float32)
    codes, scales = torch.zeros(m, k, dtype=torch.float64), torch.zeros(m, -(-k // 128), dtype=torch.float64)
    for row in range(m):
        for g in range(scales.shape[1]):
            group = x[row, 128 * g : 128 * (g + 1)]
            scales[row, g] = scale_of(group.abs().max().item(), ue8m0)
            codes[row, 128 * g : 128 * (g + 1)] = quantize_block(group, scales[row, g].item())
    return codes, scales


def expected_linear(x, w_codes, w_scales, bias, ue8m0) -> torch.Tensor:
    """float64 y[m, n] = sum_g (sum_{k in g} xq * q) * s[m, g] * scales[n // 128, g] + bias[n]."""
    xq, s = expected_activations(x, ue8m0)
    m, k = xq.shape
    n = w_codes.shape[0]
    y = torch.zeros(m, n, dtype=torch.float64)
    for g in range(s.shape[1]):
        cols = slice(128 * g, min(k, 128 * (g + 1)))
        sums = xq[:, cols] @ w_codes[:, cols].t()
        y += sums * s[:, g : g + 1] * w_scales[torch.arange(n) // 128, g]
    return y + (0.0 if bias is None else bias.to(torch.float64))


def wide_range(shape, seed: int) -> torch.Tensor:
    """Normal values times 10**U(-7, 0): blocks whose small elements land on e4m3 subnormals and round to zero."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * torch.pow(10.0, -7 * torch.rand(shape, generator=generator))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n, k", SHAPES)
def test_quantize_and_dequantize_follow_the_definition(name, n, k):
    scheme = parse_scheme(name)
    w = wide_range((n, k), seed=n + k)
    if n > 128 and k > 128:
        w[128:, 128:] = 0.0  # one all-zero block: scale 1, codes 0
    q = scheme.quantize(w)
    codes, scales = expected_weight(w, scheme.ue8m0)
    assert q.codes.dtype == torch.float8_e4m3fn and tuple(q.codes.shape) == (n, k)
    assert torch.equal(q.scales.to(torch.float64), scales)
    assert torch.equal(q.codes.to(torch.float64), codes)
    assert (codes == 0).any() and ((codes.abs() < 2**-6) & (codes != 0)).any()  # zeros and subnormals met
    if scheme.ue8m0:
        assert torch.equal(torch.frexp(q.scales)[0], torch.full_like(q.scales, 0.5))  # powers of two
    if n > 128 and k > 128:
        assert q.scales[1, 1] == 1.0 and (q.codes[128:, 128:].to(torch.float32) == 0).all()
    dequantized = scheme.dequantize(q)
    expected = (codes * scales.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]).to(torch.float32)
    assert torch.equal(dequantized, expected)
    unpacked = scheme.unpack(scheme.pack(q), k)
    assert torch.equal(scheme.dequantize(unpacked), dequantized)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [70, 200, 384])
def test_activation_quantization_follows_the_definition(name, k):
    x = wide_range((4, k), seed=k)
    x[1] = 0.0  # all-zero token: every scale 1
    xq, s = quantize_activations(x, parse_scheme(name).ue8m0)
    codes, scales = expected_activations(x, parse_scheme(name).ue8m0)
    assert torch.equal(s.to(torch.float64), scales) and (s[1] == 1.0).all()
    assert torch.equal(xq.to(torch.float64), codes)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_linear_matches_a_float64_loop_over_groups(name, n, k, dtype):
    scheme = parse_scheme(name)
    w = wide_range((n, k), seed=2 * n + k)
    x = (wide_range((3, k), seed=k) * 3).to(dtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(n))
    packed = scheme.pack(scheme.quantize(w))
    codes, scales = expected_weight(w, scheme.ue8m0)
    for b in (bias, None):
        y = scheme.reference_linear(x.reshape(1, 3, k), packed.list(), b, n)
        expected = expected_linear(x, codes, scales, b, scheme.ue8m0)
        assert y.dtype == dtype and y.shape == (1, 3, n)
        # both sum each group exactly; only the float64 combination of the groups may differ in its last bits
        torch.testing.assert_close(y[0], expected.to(dtype), rtol=0, atol=1e-12 * expected.abs().max().item())


def test_names_round_trip_and_geometry():
    for name in NAMES:
        scheme = parse_scheme(name)
        assert isinstance(scheme, FP8Block) and scheme.name == name and parse_scheme(scheme.name) == scheme
        assert scheme.family == "fp8-block" and scheme.quantizes_activations
    assert FP8Block.from_name("fp8") is None and FP8Block.from_name("fp8-block-ue8m1") is None
    scheme = parse_scheme("fp8-block")
    assert scheme.bits_per_weight(256, 512) == 8 + 32 / (128 * 128)
    specs = scheme.tensors(130, 200)
    assert [(s.name, s.shape, s.dtype) for s in specs] == [
        ("qweight", (130, 200), torch.float8_e4m3fn), ("scales", (2, 2), torch.float32)]  # fmt: skip
    assert scheme.num_groups(200) == 2 and scheme.padded_in_features(200) == 200


@pytest.mark.parametrize("n, k", [(130, 256), (64, 384)])
def test_codes_and_scales_equal_compressed_tensors_fp8_block(n, k):
    """compressed-tensors' FP8_BLOCK preset: weight scales and codes (128 x 128 blocks), and its dynamic
    group-128 activation quantization (it needs K divisible by 128), bit for bit."""
    ct = pytest.importorskip("compressed_tensors.quantization")
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.quant_scheme import FP8_BLOCK
    from compressed_tensors.quantization.utils import calculate_qparams

    assert isinstance(FP8_BLOCK["weights"], ct.QuantizationArgs)
    scheme = parse_scheme("fp8-block")
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3))
    blocks = torch.nn.functional.pad(w, (0, -k % 128, 0, -n % 128)).reshape(-(-n // 128), 128, -(-k // 128), 128)
    scale, zero = calculate_qparams(blocks.amin((1, 3)), blocks.amax((1, 3)), FP8_BLOCK["weights"])
    codes = quantize(w, scale, zero, FP8_BLOCK["weights"], dtype=torch.float8_e4m3fn)
    q = scheme.quantize(w)
    assert torch.equal(q.scales, scale)
    assert torch.equal(q.codes.view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(scheme.dequantize(q), dequantize(codes, scale, zero, FP8_BLOCK["weights"]))

    x = torch.randn(5, k, generator=torch.Generator().manual_seed(4))
    groups = x.reshape(5, k // 128, 128)
    x_scale, x_zero = calculate_qparams(groups.amin(-1), groups.amax(-1), FP8_BLOCK["input_activations"])
    x_codes = quantize(x, x_scale, x_zero, FP8_BLOCK["input_activations"], dtype=torch.float8_e4m3fn)
    xq, s = quantize_activations(x)
    assert torch.equal(s, x_scale) and torch.equal(xq.view(torch.uint8), x_codes.view(torch.uint8))


def test_bad_tensors_are_refused_naming_the_tensor():
    scheme = parse_scheme("fp8-block")
    packed = scheme.pack(scheme.quantize(torch.randn(130, 200))).list()
    wrong_scales = [packed[0], torch.ones(130, 2)]
    expected = r"layer\.3: fp8-block: scales is float32\[130, 2\], expected float32\[2, 2\]"
    with pytest.raises(ValueError, match=expected):
        scheme.check_packed(wrong_scales, 130, 200, where="layer.3")
    wrong_codes = [packed[0].view(torch.int8), packed[1]]
    with pytest.raises(ValueError, match=r"qweight is int8\[130, 200\], expected float8_e4m3fn\[130, 200\]"):
        scheme.check_packed(wrong_codes, 130, 200)
    x = torch.randn(2, 200)
    with pytest.raises((ValueError, RuntimeError), match="scales"):
        torch.ops.qcompile.linear(x, wrong_scales, None, "fp8-block", 200, 130)
    with pytest.raises(ValueError, match=r"fp8-block: the weight must be \[N, K\], got float32\[200\]"):
        scheme.quantize(torch.randn(200))


@pytest.mark.filterwarnings("ignore:calibration. these sites keep unscaled weights")
@pytest.mark.parametrize("algorithm", ["rtn", "awq", "smoothquant"])
def test_the_family_algorithms_write_it(algorithm):
    """The registered algorithms quantize a whole (tiny) model to fp8-block; its logits stay near the float model's
    and the scaling algorithms change the written codes."""
    from qcompile.models import tiny_llama
    from qcompile.nn import QuantizedLinear

    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 128, (1, 32), generator=generator) for _ in range(4)]
    reference = tiny_llama()
    recipe = {"default": "fp8-block", "algorithm": algorithm}
    model = qcompile.quantize(tiny_llama(), recipe, calibration=None if algorithm == "rtn" else ids,
                              progress_bar=False)  # fmt: skip
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 14 and all(m.scheme == "fp8-block" for m in layers)
    held_out = torch.randint(0, 128, (1, 40), generator=generator)
    with torch.no_grad():
        got, expected = model(input_ids=held_out).logits, reference(input_ids=held_out).logits
    assert ((got - expected).pow(2).mean() / expected.pow(2).mean()).item() < 1e-2
    if algorithm != "rtn":
        rtn = qcompile.quantize(tiny_llama(), "fp8-block", progress_bar=False)
        site = "model.layers.0.self_attn.q_proj"
        assert not torch.equal(model.get_submodule(site).dequantized_weight(),
                               rtn.get_submodule(site).dequantized_weight())  # fmt: skip
