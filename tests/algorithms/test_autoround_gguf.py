"""AutoRound on GGUF's legacy grids (q4_0, q4_1, q5_0, q5_1, q8_0): at its start it is llama.cpp's reference
quantization byte for byte (``gguf.quants.quantize``); the blocks it writes decode (``gguf.quants.dequantize``) to
exactly the fake-quantized weight its kept step used, with ``d``, ``m`` the float16 of the clipped-range formulas
(float64 here); block output error not above the reference quantization's; K-quants and IQ4 types refused by name."""

import copy

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

import qcompile
from qcompile.algorithms.autoround import Settings, optimise, site_rounding
from qcompile.models import tiny_llama
from qcompile.nn import QuantizedLinear
from qcompile.schemes import parse_scheme

LEGACY = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
N, K = 6, 70  # ragged: K is no multiple of the 32-element block


def _ggml(name: str):
    return gguf.GGMLQuantizationType[name.upper()]


def _padded(w: torch.Tensor) -> np.ndarray:
    k = -(-w.shape[1] // 32) * 32
    return torch.nn.functional.pad(w, (0, k - w.shape[1])).numpy()


def _decoded(name: str, blocks: torch.Tensor, k: int) -> torch.Tensor:
    """The peer's dequantization of ``blocks uint8 [N, bytes]`` → ``float32 [N, k]``."""
    return torch.from_numpy(dequantize(blocks.numpy(), _ggml(name))).reshape(blocks.shape[0], -1)[:, :k]


def _weight(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    w[1, :32] = 0  # an all-zero block: d = 0
    w[2, 32:64] = w[2, 32:64].abs() + 0.5  # an all-positive block
    return w


def _randomise(rounding, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        rounding.offsets.copy_(torch.rand(rounding.offsets.shape, generator=g) - 0.5)
        rounding.max_factor.copy_(0.5 + 0.5 * torch.rand(rounding.max_factor.shape, generator=g))
        rounding.min_factor.copy_(0.5 + 0.5 * torch.rand(rounding.min_factor.shape, generator=g))


def _formula_scales(name: str, rounding) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``d``, ``m`` per block in float64 from the module docstring (clipped range, llama.cpp's rules)."""
    x = rounding.blocks.double()
    a, b = rounding.max_factor.detach().double().squeeze(1), rounding.min_factor.detach().double().squeeze(1)
    if name in ("q4_0", "q5_0"):
        peak = x.gather(1, x.abs().argmax(1, keepdim=True)).squeeze(1)
        return a * peak / -(8 if name == "q4_0" else 16), None
    if name in ("q4_1", "q5_1"):
        lo = x.amin(1) * b
        return (x.amax(1) * a - lo) / (15 if name == "q4_1" else 31), lo
    return x.abs().amax(1) * a / 127, None


@pytest.mark.parametrize("name", LEGACY)
def test_start_is_llama_cpp_reference_quantization_byte_for_byte(name):
    w = _weight()
    scheme = parse_scheme(name)
    blocks = scheme.pack(site_rounding(scheme, w).result())["blocks"]
    expected = quantize(_padded(w), _ggml(name))
    assert np.array_equal(blocks.numpy(), expected)


@pytest.mark.parametrize("name", LEGACY)
def test_written_blocks_decode_to_the_fake_weight_with_float16_scales(name):
    """Arbitrary offsets and clipping factors: the file decodes (peer) to the forward's weight exactly; its ``d``
    (and ``m``) are the float16 of the float64 formulas (within float16 rounding), its codes in range."""
    w = _weight()
    scheme = parse_scheme(name)
    rounding = site_rounding(scheme, w)
    _randomise(rounding)
    fake = rounding.fake_weight().detach()
    blocks = scheme.pack(rounding.result())["blocks"]
    assert torch.equal(_decoded(name, blocks, K), fake)
    assert not torch.equal(blocks, scheme.pack(scheme.quantize(w))["blocks"])  # not round to nearest
    rows = blocks.reshape(-1, scheme.kind.nbytes)
    d_file = rows[:, 0:2].contiguous().view(torch.float16).reshape(-1).double()
    d_ref, m_ref = _formula_scales(name, rounding)
    assert torch.allclose(d_file, d_ref, rtol=2**-11, atol=2**-24), (d_file - d_ref).abs().max()
    assert float(d_file[3]) == 0  # the all-zero block (row 1, block 0)
    if m_ref is not None:
        m_file = rows[:, 2:4].contiguous().view(torch.float16).reshape(-1).double()
        assert torch.allclose(m_file, m_ref, rtol=2**-11, atol=2**-24)
    q = scheme.kind.decode(rows)["q"].to(torch.int32)
    lo, hi = (-127, 127) if name == "q8_0" else (0, scheme.kind.hi)
    assert int(q.min()) >= lo and int(q.max()) <= hi


@pytest.mark.parametrize("name", ("q4_0", "q4_1"))
def test_kept_iterate_after_signsgd_is_what_the_file_holds(name):
    """A real optimisation (the loss on ``x Wᵀ``): the kept step's fake weight is what the blocks decode to, its
    loss at most the start's (llama.cpp's reference quantization)."""
    w = _weight(3)
    x = torch.randn(64, K, generator=torch.Generator().manual_seed(4))
    scheme = parse_scheme(name)
    rounding = site_rounding(scheme, w)
    target = x @ w.t()

    def loss_of(chosen):
        return (x @ rounding.fake_weight().t() - target).pow(2).mean()

    before, after = optimise([rounding], loss_of, 1, Settings(12, 0.01, 0.01, None, 1, 0))
    fake = rounding.fake_weight().detach()
    blocks = scheme.pack(rounding.result())["blocks"]
    assert torch.equal(_decoded(name, blocks, K), fake)
    rtn = _decoded(name, torch.from_numpy(quantize(_padded(w), _ggml(name))).reshape(N, -1), K)
    rtn_loss = float((x @ rtn.t() - target).pow(2).mean())
    assert before == pytest.approx(rtn_loss, rel=1e-6)
    assert after == pytest.approx(float((x @ fake.t() - target).pow(2).mean()), rel=1e-6)
    assert after < before, (before, after)  # measured ~5 % lower at 12 steps


def _ids(count=4, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (1, length), generator=g) for _ in range(count)]


def _block_outputs(model, ids):
    outputs = []
    block = model.model.layers[0]
    handle = block.register_forward_hook(lambda _m, _a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        for x in ids:
            model(input_ids=x)
    handle.remove()
    return torch.cat([o.reshape(-1, o.shape[-1]) for o in outputs])


def test_q4_0_recipe_end_to_end_block_error_below_reference_quantization(capfd):
    """Every batch in every step (the kept loss is at most llama.cpp's reference quantization's on them); the
    quantized model's first block, run by its kernels, is closer to the float block than the reference's."""
    reference = tiny_llama(layers=1)
    ids = _ids()
    recipe = {"default": "q4_0", "algorithm": "autoround", "options": {"iters": 6}}
    model = qcompile.quantize(copy.deepcopy(reference), recipe, calibration=ids, progress_bar=False)
    rtn = qcompile.quantize(copy.deepcopy(reference), "q4_0", progress_bar=False)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(linears) == 7 and all(m.scheme == "q4_0" for m in linears.values())
    rtn_linears = dict(rtn.named_modules())
    changed = [n for n, m in linears.items() if not torch.equal(m.blocks, rtn_linears[n].blocks)]
    assert changed  # AutoRound moved some codes or scales away from round to nearest
    for n, m in linears.items():  # the module computes with what its blocks decode to (peer)
        assert torch.equal(m.dequantized_weight(), _decoded("q4_0", m.blocks, m.in_features)), n
    float_out = _block_outputs(reference, ids)
    error = float((_block_outputs(model, ids) - float_out).pow(2).mean())
    error_rtn = float((_block_outputs(rtn, ids) - float_out).pow(2).mean())
    assert error < 0.9 * error_rtn, (error, error_rtn)  # measured 0.73x with 6 iterations
    line = [x for x in capfd.readouterr().err.splitlines() if x.startswith("autoround: model.layers.0:")]
    assert len(line) == 1 and "7 sites" in line[0], line


@pytest.mark.parametrize("name", ("q4_k", "q6_k", "iq4_nl"))
def test_k_quants_and_iq4_refused_by_name(name):
    with pytest.raises(ValueError, match=rf"site layer\.x: algorithm 'autoround' writes the legacy GGUF types .*"
                                         rf"'{name}' is a K-quant or IQ4 type"):  # fmt: skip
        site_rounding(parse_scheme(name), torch.randn(4, 256), "layer.x")


def test_k_quant_recipe_refused_naming_the_site():
    recipe = {"default": "q4_k", "algorithm": "autoround", "options": {"iters": 1}}
    with pytest.raises(ValueError, match=r"site model\.layers\.0\.\S+: .*'q4_k' is a K-quant"):
        qcompile.quantize(tiny_llama(layers=1, hidden=256, intermediate=256), recipe, calibration=_ids(1),
                          progress_bar=False)  # fmt: skip
