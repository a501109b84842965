"""AWQ's scale search and SmoothQuant's smoothing scale, and the folds that keep the float model's function."""

import torch

from qcompile.algorithms.awq import candidate_scale, search_scale
from qcompile.algorithms.scaling import FoldGroup, fold_scale, why_not_foldable
from qcompile.algorithms.smoothquant import smoothing_scale
from qcompile.schemes import parse_scheme


def test_awq_search_is_identity_for_uniform_activations():
    g = torch.Generator().manual_seed(0)
    k = 128
    signs = torch.randint(0, 2, (256, k), generator=g).to(torch.float32) * 2 - 1
    x = 0.5 * signs  # every channel has mean |x| = 0.5
    weights = [torch.randn(48, k, generator=g), torch.randn(32, k, generator=g)]
    scheme = parse_scheme("int4-g32")
    scale, alpha, errors = search_scale(weights, [scheme, scheme], x, x.abs().mean(0))
    assert torch.equal(scale, torch.ones(k))
    assert alpha == 0.0 and len(errors) == 20
    assert max(errors) == min(errors)  # every candidate is the identity


def test_awq_search_protects_salient_channels():
    g = torch.Generator().manual_seed(1)
    k = 128
    x = torch.randn(512, k, generator=g)
    x[:, :4] *= 30  # salient input channels
    weight = torch.randn(64, k, generator=g)
    scheme = parse_scheme("int4-g128")
    scale, alpha, errors = search_scale([weight], [scheme], x, x.abs().mean(0))
    assert alpha > 0
    assert scale[:4].min() > scale[4:].max()
    # measured: the best α (0.35) cuts the output error to 0.20x of round to nearest (errors[0], α = 0)
    assert min(errors) < 0.4 * errors[0]
    # recomputed here in float64, apart from the search: y = x W^T against (x / s) Q(W s)^T and x Q(W)^T
    x64, w64, s64 = x.double(), weight.double(), scale.double()
    exact = x64 @ w64.t()
    rtn = x64 @ scheme.dequantize(scheme.quantize(weight)).double().t()
    awq = (x64 / s64) @ scheme.dequantize(scheme.quantize(weight * scale)).double().t()
    rtn_error, awq_error = (rtn - exact).pow(2).mean().item(), (awq - exact).pow(2).mean().item()
    assert awq_error <= 0.4 * rtn_error, (awq_error, rtn_error)


def test_candidate_scale_is_normalised():
    m = torch.tensor([0.1, 1.0, 10.0])
    s = candidate_scale(m, 1.0)
    torch.testing.assert_close(s.max() * s.min(), torch.tensor(1.0))
    torch.testing.assert_close(candidate_scale(m, 0.0), torch.ones(3))


def test_smoothing_scale_formula():
    w = [torch.tensor([[1.0, -4.0], [0.5, 2.0]]), torch.tensor([[-2.0, 1.0]])]
    x_max = torch.tensor([9.0, 16.0])
    s = smoothing_scale(w, x_max, alpha=0.5)
    # max|W_:j| = (2, 4): s = sqrt(9)/sqrt(2), sqrt(16)/sqrt(4)
    torch.testing.assert_close(s, torch.tensor([3 / 2**0.5, 2.0]))


def test_fold_into_norm_and_linear_keeps_the_function():
    g = torch.Generator().manual_seed(2)
    norm = torch.nn.LayerNorm(16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(16, generator=g))
    up, down = torch.nn.Linear(16, 24), torch.nn.Linear(24, 16)
    modules = {"norm": norm, "up": up, "down": down}
    x = torch.randn(8, 16, generator=g)
    before = down(up(norm(x)))
    groups = [FoldGroup("norm", ("up",)), FoldGroup("up", ("down",))]
    for group, width in zip(groups, (16, 24)):
        assert why_not_foldable(modules, group) is None
        fold_scale(modules, group, torch.rand(width, generator=g) + 0.25)
    torch.testing.assert_close(down(up(norm(x))), before, rtol=1e-5, atol=1e-5)


def test_fold_refuses_grouped_query_attention_widths():
    modules = {"v": torch.nn.Linear(16, 8), "o": torch.nn.Linear(16, 16)}
    reason = why_not_foldable(modules, FoldGroup("v", ("o",)))
    assert reason is not None and "8 outputs" in reason


def test_smoothquant_improves_w8a8_on_activation_outliers():
    """Per-token int8 activations lose the small channels of a token whose outlier channels set its scale;
    SmoothQuant (α = 0.5) moves the outliers into the weights. Output errors in float64, through the w8a8 op."""
    from qcompile.runtime.ops import reference_linear

    g = torch.Generator().manual_seed(3)
    k, n = 256, 96
    x = torch.randn(512, k, generator=g)
    x[:, :6] *= 60  # a few outlier channels, as LLM activations have (Dettmers et al., 2022)
    weight = torch.randn(n, k, generator=g) * 0.05
    scheme = parse_scheme("w8a8")
    exact = x.double() @ weight.double().t()

    def w8a8_error(x_in, w_in):
        packed = scheme.pack(scheme.quantize(w_in)).list()
        y = reference_linear(x_in, packed, None, "w8a8", k, n).double()
        return (y - exact).pow(2).mean().item()

    s = smoothing_scale([weight], x.abs().amax(0), alpha=0.5)
    plain, smoothed = w8a8_error(x, weight), w8a8_error(x / s, weight * s)
    # measured: 0.07x of plain w8a8's error
    assert smoothed <= 0.5 * plain, (smoothed, plain)
