"""The ``higgs`` family: names, packing, the grids, quantization against float64 math written from the definition
(numpy; ``definitions.py`` decodes the packed bytes), the rotation, and the accuracy claim on a real SmolLM2 layer.

Tolerances: the quantizer runs in float64 and so does the definition here, so codes and scales agree exactly except
where a vector lies within a float64 rounding of two grid points' bisector (accepted when the two squared distances
differ by less than 1e-9 relative). The reference matmul against ``definitions.linear``: ``1e-5 * max|y|`` as in
``test_reference_definitions.py`` (float64 against float64 here: observed below 1e-12).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import definitions
import fp4_definition
from qcompile.schemes import PackedWeight, SchemeError, parse_scheme
from qcompile.schemes import higgs, higgs_grids
from qcompile.schemes.higgs import Higgs

#: every (p, b) at two Hadamard sizes, so every code width (2, 3, 4, 6, 8 bits) is packed
FORMS = ["higgs-2", "higgs-3", "higgs-4", "higgs-2-p1", "higgs-3-p1", "higgs-4-p1", "higgs-4-h64", "higgs-3-h64",
         "higgs-2-h32", "higgs-3-p1-h64", "higgs-4-p1-h32", "higgs-2-p1-h1024"]  # fmt: skip


# -- names ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FORMS)
def test_names_round_trip(name):
    scheme = parse_scheme(name)
    assert isinstance(scheme, Higgs) and scheme.name == name and parse_scheme(scheme.name) == scheme


def test_name_fields_and_defaults():
    assert parse_scheme("higgs-4") == Higgs(bits=4, dim=2, hadamard=512)
    assert parse_scheme("higgs-3-p1-h64") == Higgs(bits=3, dim=1, hadamard=64)
    assert parse_scheme("higgs-2-p2-h512").name == "higgs-2"  # the defaults are read, not written
    assert parse_scheme("higgs-4").group == 256 and parse_scheme("higgs-4-h64").group == 64


@pytest.mark.parametrize("name, words", [
    ("higgs-5", ["higgs-5", "bits per weight must be 2, 3 or 4, got 5"]),
    ("higgs-1", ["bits per weight must be 2, 3 or 4, got 1"]),
    ("higgs-4-p3", ["higgs-4-p3", "vector dimension p must be 1", "got 3"]),
    ("higgs-4-h100", ["higgs-4-h100", "power of two", "got 100"]),
    ("higgs-4-h16", ["from 32 to 4096", "got 16"]),
    ("higgs-4-h8192", ["got 8192"]),
    ("higgs-4-h64-p1", ["malformed higgs name", "in this order"]),
    ("higgs", ["malformed higgs name"]),
])  # fmt: skip
def test_bad_names_are_refused_by_name(name, words):
    with pytest.raises(SchemeError) as error:
        parse_scheme(name)
    for word in words:
        assert word in str(error.value)


def test_bits_per_weight():
    assert parse_scheme("higgs-4").bits_per_weight(4096, 4096) == 4 + 16 / 256
    assert parse_scheme("higgs-2").bits_per_weight(4096, 4096) == 2 + 16 / 256
    assert parse_scheme("higgs-3-p1").bits_per_weight(8, 1024) == 3 + 16 / 256
    assert parse_scheme("higgs-4-h64").bits_per_weight(576, 576) == 4 + 16 / 64
    assert parse_scheme("higgs-4-h64").bits_per_weight(576, 1536) == 4 + 16 / 64
    assert parse_scheme("higgs-4").bits_per_weight(10, 600) == (4 + 16 / 256) * 1024 / 600  # padded to 1024


# -- packing --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code_bits", [2, 3, 4, 6, 8])
def test_vector_codes_round_trip_and_follow_the_documented_order(code_bits):
    count = 48
    codes = torch.randint(0, 2**code_bits, (5, count), generator=torch.Generator().manual_seed(code_bits))
    packed = higgs.pack_vector_codes(codes, code_bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, count * code_bits // 8)
    assert torch.equal(higgs.unpack_vector_codes(packed, code_bits, count), codes.to(torch.uint8))
    # the definition's independent reader (bit positions written out in numpy)
    assert (definitions.higgs_codes(packed.numpy(), code_bits, count) == codes.numpy()).all()


def test_six_bit_layout_by_hand():
    """Codes 1, 2, 3, 4 → the 24-bit word 1 | 2 << 6 | 3 << 12 | 4 << 18 = 0x10_30_81, little-endian."""
    packed = higgs.pack_vector_codes(torch.tensor([[1, 2, 3, 4, 63, 0, 0, 0]]), 6)
    assert packed.tolist() == [[0x81, 0x30, 0x10, 0x3F, 0x00, 0x00]]


@pytest.mark.parametrize("name", ["higgs-3", "higgs-2-p1-h32", "higgs-4-h64"])
def test_scheme_pack_unpack_round_trip(name):
    scheme = parse_scheme(name)
    q = scheme.quantize(torch.randn(9, 70, generator=torch.Generator().manual_seed(0)))
    back = scheme.unpack(scheme.pack(q), 70)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scales, q.scales) and back.in_features == 70


# -- the grids ------------------------------------------------------------------------------------------------------
def test_stored_grids_have_the_declared_shapes_and_distinct_float32_points():
    for (p, b), (points, mse) in higgs_grids.load().items():
        values = np.array(points)
        assert values.shape == (2 ** (p * b), p)
        assert len({tuple(v) for v in values.tolist()}) == len(values)
        assert (values.astype(np.float32).astype(np.float64) == values).all()
        assert 0 < mse < 1


def test_known_lloyd_max_optimum_for_p1_b2():
    """The 4-level Lloyd–Max quantizer of N(0, 1): levels ±0.4528, ±1.5104, MSE 0.1175 (Max 1960)."""
    points, mse = higgs_grids.load()[(1, 2)]
    assert mse == pytest.approx(0.11748, abs=1e-4)
    np.testing.assert_allclose(np.array(points)[:, 0], [-1.5104, -0.4528, 0.4528, 1.5104], atol=1e-4)


def test_p1_grids_equal_the_peers_hard_coded_grids():
    """transformers' HIGGS grids for p = 1 (``get_higgs_grid``) are the Lloyd–Max levels: ours equal them."""
    from transformers.integrations.higgs import get_higgs_grid

    for b in (2, 3, 4):
        ours = np.array(higgs_grids.load()[(1, b)][0])
        theirs = get_higgs_grid(1, 2**b).double().numpy()
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-6)


@pytest.fixture(scope="module")
def fresh_samples():
    """Gaussian samples the grids were not fitted on (another seed)."""
    return {p: higgs_grids.gaussian_samples(1 << 18, p, seed=12345) for p in (1, 2)}


def test_stored_mse_matches_a_monte_carlo_estimate(fresh_samples):
    for (p, b), (points, mse) in higgs_grids.load().items():
        grid = torch.tensor(points, dtype=torch.float64)
        estimate = float(higgs_grids.nearest(fresh_samples[p], grid)[1].mean()) / p
        assert estimate == pytest.approx(mse, rel=0.02), (p, b)


def test_mse_falls_with_bits_and_vectors_beat_scalars_at_equal_bits():
    grids = higgs_grids.load()
    for p in (1, 2):
        assert grids[(p, 2)][1] > grids[(p, 3)][1] > grids[(p, 4)][1]
    for b in (2, 3, 4):
        assert grids[(2, b)][1] < grids[(1, b)][1], b


def test_p2_b4_grid_is_as_good_as_the_peers(fresh_samples):
    """transformers' hard-coded 256-point grid and ours, on the same fresh samples: within 1% of its MSE (measured:
    ours 0.5% above it; k-means from the product grid stops in a nearby local optimum, and a splitting (LBG) start
    does no better)."""
    from transformers.integrations.higgs import get_higgs_grid

    ours = torch.tensor(higgs_grids.load()[(2, 4)][0], dtype=torch.float64)
    theirs = get_higgs_grid(2, 256).double()
    mse = [float(higgs_grids.nearest(fresh_samples[2], g)[1].mean()) / 2 for g in (ours, theirs)]
    assert mse[0] <= mse[1] * 1.01, mse


def test_stored_grids_are_fixed_points_of_lloyds_iteration(fresh_samples):
    """One Lloyd step on fresh samples: no point whose cell holds 2000 samples or more moves by more than 0.03 (a
    cell mean's sampling noise is ~ its spread / sqrt(count)), and the MSE falls by less than 0.5% (a grid 10% too wide
    loses more in one step)."""
    for (p, b), (points, mse) in higgs_grids.load().items():
        grid = torch.tensor(points, dtype=torch.float64)
        moved, before = higgs_grids.lloyd_step(grid, fresh_samples[p])
        counts = torch.bincount(higgs_grids.nearest(fresh_samples[p], grid)[0], minlength=grid.shape[0])
        assert (moved - grid)[counts >= 2000].abs().max().item() < 0.03, (p, b)
        _, after = higgs_grids.lloyd_step(moved, fresh_samples[p])
        assert after > before * 0.995, (p, b)
    stretched = torch.tensor(higgs_grids.load()[(2, 3)][0], dtype=torch.float64) * 1.1
    moved, before = higgs_grids.lloyd_step(stretched, fresh_samples[2])
    assert higgs_grids.lloyd_step(moved, fresh_samples[2])[1] < before * 0.995  # the criterion tells a non-fixed point


def test_regenerated_grids_are_the_stored_ones_or_fixed_points():
    """``generate`` run small: the p = 1 grid (Lloyd–Max on the density, no samples) is the stored one exactly; a
    p = 2 grid fitted on 2**15 samples is a fixed point of Lloyd's iteration on them."""
    document = higgs_grids.generate(samples=1 << 15, specs=((1, 2), (2, 2)))
    assert document["grids"]["p1-b2"]["points"] == [list(p) for p in higgs_grids.load()[(1, 2)][0]]
    grid = torch.tensor(document["grids"]["p2-b2"]["points"], dtype=torch.float64)
    moved, _ = higgs_grids.lloyd_step(grid, higgs_grids.gaussian_samples(1 << 15, 2, higgs_grids.SEED))
    assert (moved - grid).abs().max().item() < 1e-4
    assert document["grids"]["p2-b2"]["mse"] == pytest.approx(higgs_grids.load()[(2, 2)][1], rel=0.03)


# -- the rotation ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h", [32, 64, 512])
def test_walsh_hadamard_is_the_orthogonal_sylvester_matrix(h):
    x = torch.randn(3, 2 * h, dtype=torch.float64, generator=torch.Generator().manual_seed(h))
    dense = torch.from_numpy(fp4_definition.hadamard(h))  # entries (-1)**popcount(i & j) / sqrt(h)
    expected = (x.reshape(3, 2, h) @ dense).reshape(3, 2 * h)
    torch.testing.assert_close(higgs.walsh_hadamard(x, h), expected, rtol=0, atol=1e-13)
    torch.testing.assert_close(dense @ dense.t(), torch.eye(h, dtype=torch.float64), rtol=0, atol=1e-13)
    torch.testing.assert_close(higgs.walsh_hadamard(higgs.walsh_hadamard(x, h), h), x, rtol=0, atol=1e-13)


def test_walsh_hadamard_refuses_a_ragged_width():
    with pytest.raises(ValueError, match="not a multiple of the Hadamard size 64"):
        higgs.walsh_hadamard(torch.zeros(2, 96), 64)


# -- quantization against the definition -----------------------------------------------------------------------------
def definition_quantize(name: str, weight: np.ndarray):
    """float64 numpy, from the scheme docstring: pad, rotate (dense parity Hadamard), per-group RMS rounded to float32
    then float16, nearest grid point by brute force. Returns ``(codes [N, V], distance gap [N, V], scales [N, G],
    Wr [N, Kp])``; the gap is how much farther the second nearest point is (relative)."""
    scheme = parse_scheme(name)
    p, b, h = scheme.dim, scheme.bits, scheme.hadamard
    n, k = weight.shape
    kp, g = definitions.higgs_kp(scheme, k), min(256, h)
    rotated = fp4_definition.padded_rotated(weight, kp, h)
    rms = np.sqrt((rotated.reshape(n, kp // g, g) ** 2).mean(-1))
    scales = rms.astype(np.float32).astype(np.float16).astype(np.float64)
    unit = np.repeat(scales, g, axis=1)
    normalized = np.where(unit > 0, rotated / np.where(unit > 0, unit, 1), 0).reshape(n, kp // p, p)
    grid = definitions.higgs_grid(p, b)
    distance = ((normalized[:, :, None, :] - grid[None, None]) ** 2).sum(-1)
    order = np.argsort(distance, axis=-1, kind="stable")
    best, second = np.take_along_axis(distance, order[..., :2], -1).transpose(2, 0, 1)
    gap = (second - best) / np.maximum(second, 1e-300)
    codes = order[..., 0]
    return codes, gap, scales, grid[codes].reshape(n, kp) * unit


@pytest.mark.parametrize("name, k", [(name, 70) for name in FORMS if name.endswith(("-h64", "-h32"))]
                         + [("higgs-4-h64", 70), ("higgs-2-p1-h64", 70), ("higgs-4", 600), ("higgs-3", 600),
                            ("higgs-2-p1", 600), ("higgs-4-p1", 600)])  # fmt: skip
def test_quantize_matches_the_definition_on_ragged_shapes(name, k):
    scheme = parse_scheme(name)
    n = 11
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(k)) * torch.linspace(0.01, 3, n)[:, None]
    weight[3] = 0.0  # a zero row: scale 0, dequantizes to zero
    packed = scheme.pack(scheme.quantize(weight))
    codes, gap, scales, wr = definition_quantize(name, weight.double().numpy())
    kp = definitions.higgs_kp(scheme, k)
    got_codes = definitions.higgs_codes(packed.qweight.numpy(), scheme.code_bits, kp // scheme.dim)
    assert (packed.scales.double().numpy() == scales).all()
    differ = got_codes != codes
    assert not differ[gap > 1e-9].any(), f"{name}: {differ.sum()} codes off the definition"
    # the weight as the scheme decodes it, in the input basis, against the definition's Wr @ Hb.T
    wr_packed = definitions.higgs_weight(scheme, packed.list(), n, k)
    expected = fp4_definition.padded_rotated(wr_packed, kp, scheme.hadamard)
    np.testing.assert_allclose(scheme.dequantize(scheme.unpack(packed, k)).double().numpy(), expected[:, :k],
                               rtol=0, atol=1e-6 * np.abs(expected).max())  # fmt: skip
    if not differ.any():
        np.testing.assert_array_equal(wr_packed, wr)
    assert (scheme.dequantize(scheme.unpack(packed, k))[3] == 0).all()


@pytest.mark.parametrize("name", ["higgs-4-h64", "higgs-3", "higgs-2-p1"])
def test_weight_error_is_the_grids_mse_on_gaussian_weights(name):
    """A Gaussian weight is rotated into a Gaussian weight, so its relative squared error is the grid's MSE (plus
    the float16 rounding of the scales, far below it)."""
    scheme = parse_scheme(name)
    weight = torch.randn(64, 1024, generator=torch.Generator().manual_seed(3))
    error = (scheme.dequantize(scheme.quantize(weight)) - weight).pow(2).sum() / weight.pow(2).sum()
    assert error.item() == pytest.approx(higgs_grids.load()[(scheme.dim, scheme.bits)][1], rel=0.05)


@pytest.mark.parametrize("name, k", [(name, 70 if "-h" in name else 197) for name in FORMS])
def test_reference_linear_matches_the_definition(name, k):
    scheme = parse_scheme(name)
    generator = torch.Generator().manual_seed(5)
    packed = scheme.pack(scheme.quantize(torch.randn(13, k, generator=generator))).list()
    x, bias = torch.randn(4, k, generator=generator), torch.randn(13, generator=generator)
    x[2] = 0.0
    expected, _ = definitions.linear(scheme, x, packed, bias, 13)
    got = scheme.reference_linear(x, packed, bias, 13).double().numpy()
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    np.testing.assert_allclose(got[2], bias.double().numpy(), rtol=1e-6)


def test_reference_matmul_is_the_rotated_product_and_approximates_the_float_layer():
    """``(x_p Hb) Wr.T`` equals ``x @ dequantize(W).T`` (the input-basis weight) and is close to ``x @ W.T``."""
    scheme = parse_scheme("higgs-4-h64")
    generator = torch.Generator().manual_seed(8)
    weight, x = torch.randn(40, 150, generator=generator), torch.randn(6, 150, generator=generator)
    q = scheme.quantize(weight)
    y = scheme.reference_linear(x, scheme.pack(q).list(), None, 40)
    torch.testing.assert_close(y, x @ scheme.dequantize(q).t(), rtol=1e-5, atol=1e-4)
    relative = ((y - x @ weight.t()).pow(2).sum() / (x @ weight.t()).pow(2).sum()).item()
    assert relative < 0.02


# -- bad input ------------------------------------------------------------------------------------------------------
def test_non_finite_weights_are_refused():
    weight = torch.randn(4, 64)
    weight[1, 5] = math.inf
    with pytest.raises(ValueError, match=r"higgs-4: the weight \[N=4, K=64\] has non-finite values"):
        parse_scheme("higgs-4").quantize(weight)


def test_wrong_packed_tensors_are_refused_naming_the_tensor():
    scheme = parse_scheme("higgs-3-h64")
    packed = scheme.pack(scheme.quantize(torch.randn(8, 70))).list()
    with pytest.raises(ValueError, match=r"scales is float32\[8, 2\], expected float16\[8, 2\]"):
        scheme.check_packed([packed[0], packed[1].float()], 8, 70, where="site")
    with pytest.raises(ValueError, match=r"site: higgs-3-h64: qweight is uint8\[8, 47\], expected uint8\[8, 48\]"):
        scheme.check_packed([packed[0][:, :47], packed[1]], 8, 70, where="site")
    with pytest.raises(ValueError, match="6-bit row has 47 bytes"):
        higgs.unpack_vector_codes(packed[0][:, :47].contiguous(), 6, 64)
    with pytest.raises(ValueError, match=r"higgs-3-h64: 1 packed tensors, expected 2 \(qweight, scales\)"):
        PackedWeight.from_list(scheme, packed[:1], 8, 70)


# -- the accuracy claim ---------------------------------------------------------------------------------------------
#: SmolLM2-135M's layers: attention q (N = K = 576) and the MLP's down projection (N = 576, K = 1536)
SMOLLM2_LAYERS = ["blk.0.attn_q.weight", "blk.5.ffn_down.weight"]


@pytest.fixture(scope="module")
def smollm2_weights():
    """Float32 weights of two SmolLM2-135M layers, decoded from the bundled GGUF (its linears are Q4_1: 4-bit codes
    with a float16 scale and minimum per 32, so these are Q4_1's values) by the peer gguf-py."""
    from gguf import GGUFReader, quants

    from qcompile import models

    reader = GGUFReader(models.smollm2_gguf_path())
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for name in SMOLLM2_LAYERS:
        t = tensors[name]
        out[name] = torch.from_numpy(quants.dequantize(t.data, t.tensor_type).astype(np.float32))
    return out


def relative_error(scheme_name: str, weight: torch.Tensor) -> float:
    scheme = parse_scheme(scheme_name)
    approx = scheme.dequantize(scheme.unpack(scheme.pack(scheme.quantize(weight)), weight.shape[1]))
    return ((approx - weight).pow(2).sum() / weight.pow(2).sum()).item()


#: rivals with groups dividing the layer's K (no padding), and their bits per weight (float32 scales and zeros)
RIVALS = {"blk.0.attn_q.weight": {"nf4-g64": 4.5, "int4-g64-sym": 4.5, "int4-g192": 4 + 64 / 192},
          "blk.5.ffn_down.weight": {"nf4-g64": 4.5, "int4-g64-sym": 4.5, "int4-g192": 4 + 64 / 192, "int4-g128": 4.5}}


@pytest.mark.parametrize("layer", SMOLLM2_LAYERS)
def test_higgs4_beats_nf4_and_int4_at_about_equal_bits_on_smollm2(smollm2_weights, layer):
    """Weight-space relative MSE on a real layer: HIGGS-4 with h = 64 (dividing 576 and 1536: no padding) at 4.25 bits
    per weight (4 + 16/64) against nf4 and int4 RTN at 4.33 to 4.5 bits. Measured: higgs-4-h64 0.0076 on both layers;
    attn_q nf4-g64 0.0101, int4-g64-sym 0.0170, int4-g192 0.0162; ffn_down nf4-g64 0.0086, int4-g128 0.0097. (Only
    more bits beat it: int4-g64 at 5.0 bits, 0.0062 on ffn_down, and int4-g32 at 6.0 recovers these Q4_1 weights,
    made of asymmetric 4-bit blocks of 32, exactly.) Likewise HIGGS-3-h64 at 3.25 bits against int3-g64 at 4.0."""
    weight = smollm2_weights[layer]
    n, k = weight.shape
    assert parse_scheme("higgs-4-h64").bits_per_weight(n, k) == 4.25
    higgs4 = relative_error("higgs-4-h64", weight)
    for name, bits in RIVALS[layer].items():
        assert parse_scheme(name).bits_per_weight(n, k) == pytest.approx(bits)
        assert higgs4 < relative_error(name, weight), name
    assert parse_scheme("higgs-3-h64").bits_per_weight(n, k) == 3.25
    assert relative_error("higgs-3-h64", weight) < relative_error("int3-g64", weight)
