"""The ``spqr-3`` scheme against the peer ``spqr_quant`` 0.2.0 and float64 math from its source.

``spqr_quant``'s package import builds its CUDA extension, so its Python modules (``inference.py``,
``sparse_util.py``) are loaded here from their files with the extension module stubbed: the stub's compressor is a
line-by-line transcription of the package's C++ ``tensor_compress_interleaved`` / ``TileArray::push``. The package's
own Python then sizes the dense buffer, merges columns and values (``merge_col_val``) and packs the permutation
(``pack_uint16_to_uint32``); qcompile's packed tensors must equal what it builds, bit for bit. The dequantization is
checked against ``definitions.spqr_weight`` (float64, transcribed from ``dequantize_compressed``)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import types

import numpy as np
import pytest
import torch

import definitions
from qcompile.schemes import PackedWeight, Scheme, TensorSpec, parse_scheme
from qcompile.schemes.spqr import Spqr, SpqrWeight, validate

SCHEME = parse_scheme("spqr-3")


def _weight(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def _permuted(n, k, seed=0, threshold=0.05) -> SpqrWeight:
    """A quantized weight with a random input permutation (padding features kept last) and outliers."""
    g = torch.Generator().manual_seed(seed)
    kp = SCHEME.padded_in_features(k)
    perm = torch.cat([torch.randperm(k, generator=g), torch.arange(k, kp)])
    q = SCHEME.quantize(torch.randn(n, k, generator=g)[:, perm[:k]], outlier_threshold=threshold)
    q.perm = perm
    return q


# -- the peer's own Python, with its C++ compressor transcribed ------------------------------------------------------
def _compress(m, n, bits, W, beta1, beta2, W_s, W_z, W_s_s, W_s_z, W_z_s, W_z_z, row_offsets, row_offsets_output,
              col_vals, col_vals_interleaved, sparse_strategy_compression, out):  # fmt: skip
    """``spqr_cuda.cpp: tensor_compress_interleaved`` (CSR branch) with ``TileArray<uint64_t, 3>::push``."""
    assert sparse_strategy_compression == 0 and bits == 3
    w = W.reshape(-1)
    tile_m = -(-m // beta1)

    def half_bits(t, i):
        return int(t.view(torch.int16)[i]) & 0xFFFF

    words = []
    for i in range(0, m, beta1):
        for j in range(0, n, beta2):
            tile_i, tile_j = i // beta1, j // beta2
            tile_id = tile_j * tile_m + tile_i
            # SecondOrder{.ss = {W_s_s, W_z_s}, .zz = {W_s_z, W_z_z}} as one little-endian uint64
            v = (half_bits(W_s_s, tile_id) | half_bits(W_z_s, tile_id) << 16 | half_bits(W_s_z, tile_id) << 32
                 | half_bits(W_z_z, tile_id) << 48)  # fmt: skip
            k = 0
            while k < beta1 and i + k < m:
                s_id = tile_j * tile_m * beta1 + tile_i * beta1 + k
                b = int(W_z[s_id]) << bits | int(W_s[s_id])
                for l in range(beta2):
                    if j + l < n:
                        b |= int(w[(i + k) * n + (j + l)]) << ((l + 2) * bits)
                partial = (v >> ((k // (8 // 4)) * 8)) & 0xFF
                words.append(b | partial << (bits * (beta2 + 2)))
                k += 1
            words.extend([0] * (beta1 - k))
    out.copy_(torch.tensor([x - (1 << 64) if x >= 1 << 63 else x for x in words], dtype=torch.int64))


@pytest.fixture
def spqr_quant(monkeypatch):
    """``spqr_quant.inference`` loaded from its file as ``_spqr_src.inference``, the CUDA module stubbed."""
    root = pathlib.Path(importlib.util.find_spec("spqr_quant").submodule_search_locations[0])
    package = types.ModuleType("_spqr_src")
    package.__path__ = [str(root)]
    kernels = types.ModuleType("_spqr_src.inference_kernels")
    kernels.__path__ = [str(root / "inference_kernels")]
    stub = types.ModuleType("_spqr_src.inference_kernels.cuda_kernel")
    stub.call_tensor_compress_interleaved = _compress
    for name in ("call_dequantize_compressed", "call_spqr_mul", "call_spqr_mul_fused"):
        setattr(stub, name, lambda *args, name=name: pytest.fail(f"{name} needs CUDA"))
    for name, module in [("_spqr_src", package), ("_spqr_src.inference_kernels", kernels),
                         ("_spqr_src.inference_kernels.cuda_kernel", stub)]:  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)
    modules = {}
    for name in ("sparse_util", "inference"):
        spec = importlib.util.spec_from_file_location(f"_spqr_src.{name}", root / f"{name}.py")
        modules[name] = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, f"_spqr_src.{name}", modules[name])
        spec.loader.exec_module(modules[name])
    return modules["inference"]


@pytest.mark.parametrize("n, k, threshold", [(32, 48, 0.05), (16, 128, None)])
def test_packed_tensors_are_what_spqr_quant_builds(spqr_quant, n, k, threshold):
    q = _permuted(n, k, seed=n, threshold=threshold) if threshold else SCHEME.quantize(_weight(n, k))
    packed = SCHEME.pack(q)
    g, t = k // 16, n // 16
    legacy = spqr_quant.SPQRLegacy(
        m=n, n=k, bits=3, W=q.codes.to(torch.int8), beta1=16, beta2=16,
        W_s=q.scale_codes.t().reshape(-1).to(torch.int8), W_z=q.zero_codes.t().reshape(-1).to(torch.int8),
        W_s_s=q.second[..., 0].t().reshape(-1).contiguous(), W_z_s=q.second[..., 1].t().reshape(-1).contiguous(),
        W_s_z=q.second[..., 2].t().reshape(-1).contiguous(), W_z_z=q.second[..., 3].t().reshape(-1).contiguous(),
        row_offsets=q.row_offsets.to(torch.int32), col_ids=q.columns.to(torch.int16), values=q.values,
        in_perm=q.perm,
    )  # fmt: skip
    assert legacy.W_s_s.numel() == g * t
    csr = spqr_quant.SparseStorageConfiguration.CSR
    args = spqr_quant.ModelArgs(bits=3, beta1=16, beta2=16, sparse_compression=csr)
    module = spqr_quant.QuantizedLinear.from_legacy(legacy, args, "cpu")
    assert torch.equal(module.dense_weights.data, packed["dense_weights"])
    assert torch.equal(module.row_offsets.data, packed["row_offsets"])
    if q.nnz:
        assert module.col_vals.dtype == torch.int32 and torch.equal(module.col_vals.data, packed["col_vals"])
    else:  # merge_col_val returns an empty float tensor
        assert module.col_vals.numel() == 0 and packed["col_vals"].numel() == 0
    assert torch.equal(module.in_perm.data, packed["in_perm"])
    assert module.nnz == q.nnz


@pytest.mark.parametrize("n, k", [(9, 70), (24, 80), (131, 197), (16, 4096)])
def test_declared_lengths_are_spqr_quants_buffer_sizes(spqr_quant, n, k):
    specs = {s.name: s for s in SCHEME.tensors(n, k)}
    assert specs["dense_weights"].shape == (spqr_quant.QuantizedLinear._calculate_weight_buffer_size(n, k, 16, 16),)
    assert specs["row_offsets"].shape == (n + 1,) and specs["in_perm"].shape == (-(-k // 16) * 8,)
    assert specs["col_vals"].describe() == "int32[nnz]"


# -- dequantization: float64 from spqr_quant's source -----------------------------------------------------------------
@pytest.mark.parametrize("n, k, threshold", [(24, 80, 0.05), (9, 70, 0.02), (40, 33, None)])
def test_dequantization_is_spqr_quants(n, k, threshold):
    q = _permuted(n, k, seed=k, threshold=threshold)
    packed = SCHEME.pack(q)
    expected = definitions.spqr_weight(SCHEME, packed.list(), n, k)[:, :k]
    got = SCHEME.dequantize_packed(packed, n, k).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=2**-23, atol=0)  # float32 sum of two float16 at most
    assert torch.equal(SCHEME.dequantize(q), SCHEME.dequantize_packed(packed, n, k))


def test_one_hand_made_tile_decodes_to_the_published_formula():
    """One tile, fields set by hand: ss = 0.25, zs = 0.5, sz = 1, zz = 2 (float16 bits 0x3400, 0x3800, 0x3C00,
    0x4000); row 3 has qs = 5, qz = 6 and codes c % 8, so scale = 0.25 * (5 - 1) = 1, zero = 0.5 * (6 - 2) = 2."""
    second = 0x3400 | 0x3800 << 16 | 0x3C00 << 32 | 0x4000 << 48
    words = torch.zeros(16, dtype=torch.int64)
    for r in range(16):
        words[r] = ((second >> (8 * (r // 2))) & 0xFF) << 54
    word = 5 | 6 << 3
    for c in range(16):
        word |= (c % 8) << (6 + 3 * c)
    words[3] |= word
    identity = torch.arange(16)
    packed = PackedWeight({"dense_weights": words, "row_offsets": torch.zeros(17, dtype=torch.int32),
                           "col_vals": torch.zeros(0, dtype=torch.int32),
                           "in_perm": (identity[1::2] << 16 | identity[0::2]).to(torch.int32)})  # fmt: skip
    w = SCHEME.dequantize_packed(packed, 16, 16)
    assert w[3].tolist() == [float(c % 8 - 2) for c in range(16)]
    # rows with codes 0: qs = qz = 0: scale = 0.25 * (0 - 1), zero = 0.5 * (0 - 2) → w = -0.25 * (0 + 1)
    assert w[0].tolist() == [-0.25] * 16


def test_fp16_steps_round_each_operation():
    """``h(s * h(q - z))`` differs from the unrounded product: the reference rounds like spqr_quant's __hmul/__hsub."""
    q = SCHEME.quantize(_weight(16, 16, seed=5) * 1e-2)
    assert torch.equal(torch.from_numpy(definitions.spqr_weight(SCHEME, SCHEME.pack(q).list(), 16, 16)).float(),
                       SCHEME.dequantize(q))  # fmt: skip
    assert (SCHEME.dequantize(q).half().float() == SCHEME.dequantize(q)).all()  # every weight is a float16


# -- quantization, CSR, bits ----------------------------------------------------------------------------------------
def test_round_trip_and_ragged_padding():
    q = _permuted(9, 70, seed=1)
    u = SCHEME.unpack(SCHEME.pack(q), 70)
    for field in ("codes", "scale_codes", "zero_codes", "second", "row_offsets", "columns", "values", "perm"):
        assert torch.equal(getattr(q, field).to(getattr(u, field).dtype), getattr(u, field)), field
    assert q.codes.shape == (16, 80) and q.row_offsets.shape == (10,)
    words = SCHEME.pack(q)["dense_weights"].reshape(1, 5, 16)
    assert bool(((words[..., 9:] >> 54) != 0).any())  # padding rows still carry the statistics bytes


def test_outliers_follow_the_threshold_and_store_the_residual():
    w = _weight(32, 64, seed=2)
    counts = [SCHEME.quantize(w, outlier_threshold=t).nnz for t in (None, 0.2, 0.05, 0.01)]
    assert counts[0] == 0 and counts == sorted(counts) and counts[-1] > counts[1]
    q = SCHEME.quantize(w, outlier_threshold=0.02)
    deq = SCHEME.dequantize(q)
    rows = torch.repeat_interleave(torch.arange(32), torch.diff(q.row_offsets))
    at = (rows, q.columns)
    # an outlier leaves only the float16 rounding of its residual; the others the 3-bit error
    assert ((deq[at] - w[at]).abs() <= q.values.float().abs() * 2**-10 + 1e-7).all()
    threshold = 0.02 * w.double().var(dim=0).mean()
    assert bool(((w - SCHEME.dequantize(SCHEME.quantize(w, outlier_threshold=0.02))).double()[at].abs() <
                 threshold.sqrt()).all())  # fmt: skip
    assert (deq - w).pow(2).mean() < (SCHEME.dequantize(SCHEME.quantize(w)) - w).pow(2).mean()


def test_bits_per_weight_counts_dense_words_offsets_permutation_and_outliers():
    n, k = 4096, 4096
    dense = n * k // 16 * 64
    fixed = dense + (n + 1) * 32 + k // 2 * 32
    assert SCHEME.bits_per_weight(n, k) == fixed / (n * k)
    assert SCHEME.bits_per_weight(n, k, outliers=n * k // 100) == pytest.approx(fixed / (n * k) + 0.32)
    q = SCHEME.quantize(_weight(32, 64), outlier_threshold=0.05)
    assert SCHEME.pack(q).nbytes * 8 / (32 * 64) == SCHEME.bits_per_weight(32, 64, q.nnz)


def test_names():
    assert parse_scheme("spqr-3") == Spqr() and Spqr().name == "spqr-3"
    with pytest.raises(ValueError, match="3-bit weights in 16x16 tiles only"):
        parse_scheme("spqr-4")


# -- malformed tensors ------------------------------------------------------------------------------------------------
def _packed(n=24, k=80):
    return SCHEME.pack(_permuted(n, k, seed=3))


def test_bad_csr_and_permutation_are_refused_naming_the_tensor():
    packed = _packed()
    short = PackedWeight({**packed.tensors(), "col_vals": packed["col_vals"][:-1]})
    with pytest.raises(ValueError, match="layer.q: row_offsets must rise from 0 to the length of col_vals"):
        validate(short, 24, 80, where="layer.q")
    ragged = _packed(24, 70)
    col_vals = ragged["col_vals"].clone()
    col_vals[0] = (col_vals[0] & ~0xFFFF) | 75  # permuted column 75 is padding feature 75 (K = 70, Kp = 80)
    with pytest.raises(ValueError, match=r"layer.q: col_vals\[0\] has column 75, which is no input feature"):
        validate(PackedWeight({**ragged.tensors(), "col_vals": col_vals}), 24, 70, where="layer.q")
    in_perm = packed["in_perm"].clone()
    in_perm[0] = 0
    with pytest.raises(ValueError, match="in_perm is not a permutation"):
        SCHEME.dequantize_packed(PackedWeight({**packed.tensors(), "in_perm": in_perm}), 24, 80)


def test_dynamic_axis_may_vary_but_is_checked_for_dtype_rank_and_agreement():
    packed = _packed()
    SCHEME.check_packed(packed, 24, 80)  # col_vals has nnz > 0 entries, the declaration 0
    assert packed["col_vals"].numel() > 0
    with pytest.raises(ValueError, match=r"col_vals is int64\[.*\], expected int32\[nnz\]"):
        SCHEME.check_packed([*packed.list()[:2], packed["col_vals"].long(), packed["in_perm"]], 24, 80)
    with pytest.raises(ValueError, match=r"col_vals is int32\[.*, 1\], expected int32\[nnz\]"):
        SCHEME.check_packed([*packed.list()[:2], packed["col_vals"][:, None], packed["in_perm"]], 24, 80)

    class Pair(Scheme):  # two tensors sharing one data-dependent length
        family = "test-pair"
        name = "pair"
        from_name = padded_in_features = quantize = dequantize = pack = unpack = None

        def tensors(self, n, k):
            return (TensorSpec("a", (0,), torch.int32, "", ((0, "nnz"),)),
                    TensorSpec("b", (n, 0), torch.int32, "", ((1, "nnz"),)))  # fmt: skip

    Pair().check_packed([torch.zeros(5, dtype=torch.int32), torch.zeros(3, 5, dtype=torch.int32)], 3, 8)
    with pytest.raises(ValueError, match="b has nnz=4 on axis 1, but a has nnz=5"):
        Pair().check_packed([torch.zeros(5, dtype=torch.int32), torch.zeros(3, 4, dtype=torch.int32)], 3, 8)
    with pytest.raises(ValueError, match=r"b is int32\[2, 5\], expected int32\[3, nnz\]"):
        Pair().check_packed([torch.zeros(5, dtype=torch.int32), torch.zeros(2, 5, dtype=torch.int32)], 3, 8)
