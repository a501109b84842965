"""AutoRound: block output error below round to nearest's, results that are the fake quantization the optimisation
used (checked against the module docstring's formula in float64), options checked by name, every integer grid."""

import copy

import pytest
import torch

import qcompile
from qcompile.algorithms.autoround import SiteRounding, autoround_site, optimise, settings
from qcompile.models import tiny_gpt2, tiny_llama
from qcompile.nn import QuantizedLinear
from qcompile.schemes import parse_scheme


def _ids(count=4, length=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (1, length), generator=g) for _ in range(count)]


def _block_outputs(model, ids, block=None):
    """The first decoder block's outputs on ``ids``, rows ``[tokens, hidden]``."""
    block = block or model.model.layers[0]
    outputs = []
    handle = block.register_forward_hook(lambda _m, _a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        for x in ids:
            model(input_ids=x)
    handle.remove()
    return torch.cat([o.reshape(-1, o.shape[-1]) for o in outputs])


def _formula(site: SiteRounding) -> torch.Tensor:
    """The module docstring's fake quantization in float64 from the site's V, α, β (independent of its code)."""
    grid = site.grid
    w = grid._grouped(site.weight).double()
    v, a, b = (p.detach().double() for p in (site.offsets, site.max_factor, site.min_factor))
    if grid.symmetric:
        s = w.abs().amax(-1, keepdim=True) * a / (2 ** (grid.bits - 1) - 1)
        s = torch.where(s > 0, s, torch.ones_like(s))
        z, lo = torch.full_like(s, 2.0 ** (grid.bits - 1)), 1
    else:
        s = (w.amax(-1, keepdim=True) * a - w.amin(-1, keepdim=True) * b) / (2**grid.bits - 1)
        s = torch.where(s > 0, s, torch.ones_like(s))
        z, lo = -w.amin(-1, keepdim=True) * b / s, 0
    u = torch.clamp(torch.round(w / s + z + v), lo, 2**grid.bits - 1)
    return ((u - z) * s).reshape(w.shape[0], -1)[:, : site.weight.shape[1]]


def test_block_output_error_below_round_to_nearest_on_the_calibration_data(capfd):
    reference = tiny_llama(layers=1)
    ids = _ids()
    recipe = {"default": "int3-g32", "algorithm": "autoround", "options": {"iters": 8, "samples": 4}}
    model = qcompile.quantize(copy.deepcopy(reference), recipe, calibration=ids, progress_bar=False)
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 7
    rtn = qcompile.quantize(copy.deepcopy(reference), "int3-g32", progress_bar=False)
    float_out = _block_outputs(reference, ids)
    error = float((_block_outputs(model, ids) - float_out).pow(2).mean())
    error_rtn = float((_block_outputs(rtn, ids) - float_out).pow(2).mean())
    assert error < 0.9 * error_rtn, (error, error_rtn)  # measured 0.35x with 8 iterations
    err = capfd.readouterr().err.splitlines()
    line = [x for x in err if x.startswith("autoround: model.layers.0:")]
    assert len(line) == 1 and "7 sites" in line[0] and "(round to nearest) ->" in line[0], line
    assert not [x for x in err if x.startswith("autoround: model.layers.0.")]  # block results reused, no per-site run


def test_transposed_sites_gpt2_never_above_round_to_nearest_on_the_first_block():
    """GPT-2's Conv1D weights are stored [K, N]; with every batch in each step the kept loss is at most RTN's."""
    reference = tiny_gpt2()
    ids = [torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    recipe = {"default": "int4-g32", "algorithm": "autoround", "options": {"iters": 4, "lr": 0.02}}
    model = qcompile.quantize(copy.deepcopy(reference), recipe, calibration=ids, progress_bar=False)
    rtn = qcompile.quantize(copy.deepcopy(reference), "int4-g32", progress_bar=False)

    def first_block(m):
        return _block_outputs(m, ids, m.transformer.h[0])

    float_out = first_block(reference)
    error = float((first_block(model) - float_out).pow(2).mean())
    assert error <= float((first_block(rtn) - float_out).pow(2).mean()) * (1 + 1e-5)


@pytest.mark.parametrize("name", ["int3-g32", "int4-g128", "int4-g32-sym", "int8", "int2-g64", "w4a8-g32", "w8a8"])
def test_result_is_the_fake_quantization_and_a_valid_tensor_set(name):
    torch.manual_seed(0)
    n, k = 24, 72  # K ragged for every group size
    weight, x = torch.randn(n, k), torch.randn(64, k)
    scheme = parse_scheme(name)
    site = SiteRounding(scheme, weight)
    target = x @ weight.t()
    before, after = optimise([site], lambda rows: (x[rows] @ site.fake_weight().t() - target[rows]).pow(2).mean(), 64,
                             settings({"iters": 20, "batch_size": 64, "lr": 0.01, "minmax_lr": 0.002}))  # fmt: skip
    assert after < before  # the kept iterate is not the start (round to nearest)
    q = site.result()
    packed = scheme.pack(q)
    scheme.check_packed(packed, n, k)
    fake = site.fake_weight().detach()
    dequantized = scheme.dequantize(scheme.unpack(packed, k))
    torch.testing.assert_close(dequantized, fake, rtol=1e-6, atol=1e-7)  # the codes and scales the loss saw
    # the float64 formula: equal but for rare rounding ties (float32 w / s + z + V), each one code step apart
    expected, step = _formula(site), q.scales.double().repeat_interleave(scheme.group_size_for(k), 1)[:, :k]
    off = (dequantized.double() - expected).abs() > 1e-5 * (1 + expected.abs())
    assert off.float().mean() <= 0.005, off.float().mean()
    torch.testing.assert_close((dequantized.double() - expected)[off].abs(), step[off], rtol=1e-4, atol=1e-6)
    if not scheme.quantizes_activations:  # activation-quantizing schemes add their own rounding of x
        y = scheme.reference_linear(x, packed.list(), None, n)
        torch.testing.assert_close(y, x @ fake.t(), rtol=1e-5, atol=1e-5)


def test_start_is_round_to_nearest():
    torch.manual_seed(1)
    weight = torch.randn(16, 40)
    for name in ("int4-g32", "int4-g32-sym", "int8"):
        scheme = parse_scheme(name)
        site = SiteRounding(scheme, weight)
        torch.testing.assert_close(site.fake_weight().detach(), scheme.dequantize(scheme.quantize(weight)))


def test_mlp_without_blocks_is_optimised_per_site_and_beats_round_to_nearest():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.GELU(), torch.nn.Linear(64, 24))
    data = [torch.randn(16, 40) for _ in range(4)]
    recipe = {"default": "int3-g32", "algorithm": "autoround", "options": {"iters": 20}}
    model = qcompile.quantize(copy.deepcopy(mlp), recipe, calibration=data, progress_bar=False)
    rtn = qcompile.quantize(copy.deepcopy(mlp), "int3-g32", progress_bar=False)
    x = torch.cat(data)
    with torch.no_grad():
        reference = mlp(x)
        assert float((model(x) - reference).pow(2).mean()) < float((rtn(x) - reference).pow(2).mean())


def test_deterministic_with_a_seed():
    torch.manual_seed(0)
    weight, x = torch.randn(16, 64), torch.randn(96, 64)
    options = {"iters": 5, "batch_size": 32, "seed": 3}
    first, second = autoround_site(parse_scheme("int4-g32"), weight, x, options), \
        autoround_site(parse_scheme("int4-g32"), weight, x, options)  # fmt: skip
    assert torch.equal(first[0].codes, second[0].codes) and torch.equal(first[0].scales, second[0].scales)
    assert first[1:] == second[1:]


def test_options_refused_by_name():
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 16))
    data = [torch.randn(4, 32)]
    with pytest.raises(ValueError, match="'iter'.*Did you mean 'iters'"):
        qcompile.quantize(copy.deepcopy(mlp), {"default": "int4-g32", "algorithm": "autoround",
                                               "options": {"iter": 5}}, calibration=data)  # fmt: skip
    with pytest.raises(ValueError, match="damp is an option of gptq"):
        qcompile.quantize(copy.deepcopy(mlp), {"default": "int4-g32", "algorithm": "autoround",
                                               "options": {"damp": 0.1}}, calibration=data)  # fmt: skip
    with pytest.raises(ValueError, match="preset 'fast' is unknown; presets: default, light, best"):
        settings({"preset": "fast"})
    with pytest.raises(ValueError, match="iters must be >= 0"):
        settings({"iters": -1})
    assert settings({"preset": "light"}).iters == 50 and settings({"preset": "light", "iters": 7}).iters == 7
    assert settings({"iters": 50}).lr == pytest.approx(0.02) and settings({"lr": 0.1}).minmax_lr == 0.1


def test_non_integer_grid_refused_naming_the_algorithm():
    with pytest.raises(ValueError, match="algorithm 'autoround' writes integer grids.*'nf4-g64'"):
        SiteRounding(parse_scheme("nf4-g64"), torch.randn(8, 64))
