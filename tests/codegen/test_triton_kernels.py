"""Triton kernels against the plain-PyTorch reference of ``qcompile::linear``.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` on small CPU tensors (set here before triton is
imported); with the interpreter off (``make test-gpu``) the same tests run on CUDA tensors, N ragged against every
tile (``N_RAGGED``). ``test_gpu_op.py`` runs the registered op of every family on a GPU.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from qcompile.codegen.triton import autotune, candidates, common, int4, paths, w8a8, w8a16  # noqa: E402
from qcompile.runtime.ops import reference_linear  # noqa: E402
from qcompile.schemes import parse_scheme  # noqa: E402

pytestmark = pytest.mark.triton

INTERPRETED = common.interpreting()
DEVICE = "cpu" if INTERPRETED else "cuda"
#: N with a partial last tile for every BLOCK_N >= 2 (on a GPU as large as a real layer's ragged edge)
N_RAGGED = 45 if INTERPRETED else 383
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)
if INTERPRETED and type(int4.int4_linear_kernel).__name__ != "InterpretedFunction":
    pytest.skip("triton kernels were created before TRITON_INTERPRET=1 was set", allow_module_level=True)


def _interpreter_runs_loops() -> bool:
    """triton < 3.7's interpreter calls ``int()`` on 1-element arrays for ``range`` bounds; numpy >= 2.4 refuses."""
    import numpy
    import triton

    if tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 7):
        return True
    try:
        int(numpy.array([1]))
    except TypeError:
        return False
    return True


if INTERPRETED and not _interpreter_runs_loops():
    pytest.skip("the interpreter of this triton (< 3.7) fails loops under numpy >= 2.4", allow_module_level=True)


def packed(scheme_name: str, n: int, k: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator)
    scheme = parse_scheme(scheme_name)
    p = scheme.pack(scheme.quantize(weight))
    return p.qweight.to(DEVICE), p.scales.to(DEVICE), None if p.get("zeros") is None else p.zeros.to(DEVICE)


def activation(m: int, k: int, dtype: torch.dtype, seed: int = 1, lead: tuple = ()) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, m, k, generator=generator).to(dtype).to(DEVICE)


def assert_matches_reference(y, x, qweight, scales, zeros, bias, scheme_name: str, tolerance: float):
    """Relative error (max |y - ref| / max |ref|), the reference computed in fp32 from the same activation."""
    tensors = [t for t in (qweight, scales, zeros) if t is not None]
    ref = reference_linear(x.float(), tensors, None if bias is None else bias.float(), scheme_name, x.shape[-1],
                           y.shape[-1])  # fmt: skip
    assert y.shape == ref.shape and y.dtype == x.dtype
    error = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    assert error < tolerance, f"{scheme_name}: relative error {error:.2e} >= {tolerance:.0e}"


def tolerance_for(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-2


# (M, K, N): aligned, ragged K (padding in the last group), ragged N, M above one tile
SHAPES = [(1, 64, 32), (3, 90, N_RAGGED), (17, 96, N_RAGGED)]


@pytest.mark.parametrize("scheme_name", ["int4-g32", "int4-g32-sym", "int4-g64", "int4", "int4-g8"])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int4_default_path(scheme_name, m, k, n):
    qweight, scales, zeros = packed(scheme_name, n, k)
    x = activation(m, k, torch.float32)
    bias = torch.randn(n).to(DEVICE)
    y = int4.int4_linear(x, qweight, scales, zeros, bias, scheme_name)
    assert_matches_reference(y, x, qweight, scales, zeros, bias, scheme_name, 1e-5)


@pytest.mark.parametrize("path", ["gemv", "splitk", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("scheme_name", ["int4-g32", "int4-g64-sym"])
def test_int4_every_path(path, dtype, with_bias, scheme_name):
    m, k, n = 3, 90, N_RAGGED
    qweight, scales, zeros = packed(scheme_name, n, k)
    x = activation(m, k, dtype)
    bias = torch.randn(n).to(dtype).to(DEVICE) if with_bias else None
    y = int4.int4_linear(x, qweight, scales, zeros, bias, scheme_name, path=path)
    assert_matches_reference(y, x, qweight, scales, zeros, bias, scheme_name, tolerance_for(dtype))


def test_int4_batched_activation_and_tuned_config():
    qweight, scales, zeros = packed("int4-g32", 48, 64)
    x = activation(3, 64, torch.float32, lead=(2,))
    config = autotune.KernelConfig(16, 16, 64, split_k=1)
    y = int4.int4_linear(x, qweight, scales, zeros, None, "int4-g32", path="gemm", config=config)
    assert y.shape == (2, 3, 48)
    assert_matches_reference(y, x, qweight, scales, zeros, None, "int4-g32", 1e-5)


@pytest.mark.parametrize("row_name", [row.name for row in paths.PATHS])
def test_bound_launchers_serve_later_calls(row_name, monkeypatch):
    """The dispatch rows' ``bind``: a launcher bound to the first call's signature serves later calls with other
    activations of that signature (a batched one, a row-strided view) and builds each config's launch once."""
    row = next(r for r in paths.PATHS if r.name == row_name)
    scheme_name = {"int4": "int4-g32", "w8a16": "int8", "w8a8": "w8a8"}[row_name.split("-")[1]]
    m, k, n = {"gemv": 3, "splitk": 6, "gemm": 17}.get(row_name.split("-")[-1], 3), 90, N_RAGGED
    qweight, scales, zeros = packed(scheme_name, n, k)
    built, init = [], autotune.BoundLaunches.__init__

    def counting_init(self, key, candidates, default, build, *rest):
        init(self, key, candidates, default, lambda *args: built.append(args) or build(*args), *rest)

    monkeypatch.setattr(autotune.BoundLaunches, "__init__", counting_init)
    monkeypatch.setenv("QCOMPILE_TRITON_TUNE", "0")  # on a GPU: one config, not a search over candidates
    first = activation(m, k, torch.bfloat16)
    tensors = [t for t in (qweight, scales, zeros) if t is not None]
    launch = row.bind(parse_scheme(scheme_name), first, tensors, None, n)
    wide = activation(m, k + 6, torch.bfloat16, seed=3)[:, :k]  # rows k + 6 apart
    for x in (first, activation(1, k, torch.bfloat16, seed=2, lead=(m,))[:, 0], wide, first.reshape(1, m, k)):
        y = launch(x, tensors, None)
        assert y.shape == (*x.shape[:-1], n)
        assert_matches_reference(y, x, qweight, scales, zeros, None, scheme_name, tolerance_for(torch.bfloat16))
    assert len(built) == 1, built
    assert launch.bound.config is not None and launch.bound.config.label  # what a benchmark row prints


@pytest.mark.parametrize("scheme_name", ["int4-g32", "int4-g64-sym", "int4"])
def test_int4_dequantize_then_dense_config(scheme_name):
    m, k, n = 5, 90, N_RAGGED
    qweight, scales, zeros = packed(scheme_name, n, k)
    x = activation(m, k, torch.float32)
    bias = torch.randn(n).to(DEVICE)
    y = int4.int4_linear(x, qweight, scales, zeros, bias, scheme_name, path="gemm", config=candidates.DEQUANT_CONFIG)
    assert_matches_reference(y, x, qweight, scales, zeros, bias, scheme_name, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "scheme_name,m,k,block_k",
    [
        ("int4-g32", 1, 90, 32),  # one row, ragged K (the last word is half padding)
        ("int4-g64-sym", 3, 90, 64),  # several rows
        ("int4-g8", 1, 90, 8),  # one word per group
        ("int4-g32", 1, 90, 64),  # BLOCK_K shrinks to the group
        ("int4-g128-sym", 4, 300, 128),
    ],
)
def test_int4_gemv_words(dtype, scheme_name, m, k, block_k):
    """The GEMV's int32-word form (8 nibbles a word, two instructions a nibble) against the reference, split-K
    included."""
    n = N_RAGGED
    qweight, scales, zeros = packed(scheme_name, n, k)
    group_size = parse_scheme(scheme_name).group_size_for(k)
    assert int4.words_shape(qweight, group_size) and common.word_aligned(qweight)
    x = activation(m, k, dtype)
    bias = torch.randn(n).to(dtype).to(DEVICE)
    for split_k in (1, 2):
        config = autotune.KernelConfig(common.m_bucket(m), 16, block_k, split_k=split_k, words=1)
        assert int4.plan("gemv", config, group_size, True)[2]
        y = int4.int4_linear(x, qweight, scales, zeros, bias, scheme_name, path="gemv", config=config)
        assert_matches_reference(y, x, qweight, scales, zeros, bias, scheme_name, tolerance_for(dtype))


@pytest.mark.parametrize("scale", [1e-12, 1e-6, 1.0, 1e6, 1e12])
@pytest.mark.parametrize("scheme_name", ["int4-g32", "int4-g32-sym"])
def test_int4_gemv_words_activation_range(scheme_name, scale):
    """The word GEMV multiplies subnormal-coded nibbles by activations scaled by 2**85: exact over a wide range of
    activation magnitudes (fp32, so the reference's own rounding is the only error)."""
    k, n = 128, 32
    qweight, scales, zeros = packed(scheme_name, n, k)
    x = activation(2, k, torch.float32) * scale
    config = autotune.KernelConfig(2, 16, 64, split_k=1, words=1)
    y = int4.int4_linear(x, qweight, scales, zeros, None, scheme_name, path="gemv", config=config)
    assert_matches_reference(y, x, qweight, scales, zeros, None, scheme_name, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "scheme_name,path,m,k,block_k",
    [
        ("int4-g32", "splitk", 5, 90, 32),  # ragged K: the last word is half padding, the last tile masked
        ("int4-g64-sym", "gemm", 17, 90, 64),  # two row tiles
        ("int4-g32", "gemm", 33, 90, 32),  # 32-row tiles: the activations' group sums come from their own launch
        ("int4-g32", "gemm", 33, 1100, 32),  # 35 K tiles: zero terms subtracted in two dots (split: from mid-range)
        ("int4", "gemm", 33, 256, 128),  # per channel: one 256-column group, two K tiles
        ("int4", "splitk", 5, 256, 64),  # per channel, tiles summing their own activations
        ("int4-g128", "gemv", 3, 300, 128),  # one to four rows on tensor cores
        ("int4-g128-sym", "gemv", 1, 256, 128),
    ],
)
def test_int4_dot_words(dtype, scheme_name, path, m, k, block_k, monkeypatch):
    """The dot kernel's word form: exact codes ``c - 8`` / ``c`` into ``tl.dot`` (in column order, or plane by
    plane), each group's scale (and zero, through the tile's activation sum) applied to the fp32 product. Only the
    output's rounding to 16 bits remains, so the tolerance is one unit in the last place (the interpreter truncates
    fp32 to bf16), not 2%."""
    n = N_RAGGED
    qweight, scales, zeros = packed(scheme_name, n, k)
    group_size = parse_scheme(scheme_name).group_size_for(k)
    x = activation(m, k, dtype)
    bias = torch.randn(n).to(dtype).to(DEVICE)
    launches, original = [], int4.Launch
    monkeypatch.setattr(int4, "Launch", lambda *args: launches.append(original(*args)) or launches[-1])
    for split_k, form in ((1, 1), (2, 1), (2, 2)):  # form 2: one dot per nibble-pair plane, where it applies
        config = autotune.KernelConfig(32 if m > 32 else 16, 16, block_k, split_k=split_k, words=form)
        assert int4.uses_dot(path, config) and int4.plan(path, config, group_size, True)[2]
        y = int4.int4_linear(x, qweight, scales, zeros, bias, scheme_name, path=path, config=config)
        launch = launches[-1]  # the word form ran, and the separate activation sums where they should
        assert launch.use_dot and launch.kwargs["WORDS"] and launch.sums == (m > 32 and zeros is not None)
        assert launch.kwargs["PLANES"] == (form == 2 and config.block_m <= 16 and launch.kwargs["BLOCK_K"] >= 64)
        tolerance = 2**-7 if dtype == torch.bfloat16 else 2**-10
        assert_matches_reference(y, x, qweight, scales, zeros, bias, scheme_name, tolerance)


@pytest.mark.parametrize("m,k,width", [(3, 90, 32), (2, 256, 256), (1, 300, 128)])
def test_int4_tile_sums(m, k, width):
    """``tile_sums`` ``[cdiv(K, width), M]``: each row's sum over each ``width`` columns, ragged last tile too."""
    x = activation(m, k, torch.float16)
    sums = int4.tile_sums(x, k, width)
    padded = torch.nn.functional.pad(x.float(), (0, -k % width))
    assert torch.allclose(sums, padded.reshape(m, -1, width).sum(-1).T, rtol=1e-5, atol=1e-4)


def test_int4_defaults_take_bytes_where_words_cannot_run(monkeypatch):
    """GPU defaults: word-form dots with 128-deep K tiles only where the word form runs; elsewhere (fp32
    activations, groups of 16) the byte-form defaults, whose 64-deep tiles need half the shared memory."""
    monkeypatch.setattr(common, "interpreting", lambda: False)  # the GPU defaults, wherever this runs
    for path, m in (("gemv", 3), ("splitk", 8), ("gemm", 64), ("gemm", 300)):
        assert int4.default_config(path, m, 128, True).words
        assert int4.default_config(path, m, 128, False) == candidates.standard_default(path, m)
        assert int4.default_config(path, m, 16, True) == candidates.standard_default(path, m)


def test_fewer_stages_when_shared_memory_runs_out():
    """A launch that needs more shared memory than the device has is retried with fewer pipeline stages."""
    from triton.runtime.errors import OutOfResources

    kwargs, tried = {"num_stages": 4}, []

    def launch():
        tried.append(kwargs["num_stages"])
        if kwargs["num_stages"] > 2:
            raise OutOfResources(150000, 101376, "shared memory")
        return "ran"

    def retrying():
        try:
            return launch()
        except Exception as error:
            if not common.fewer_stages(error, kwargs, "a test kernel"):
                raise
            return retrying()

    assert retrying() == "ran" and tried == [4, 3, 2] and kwargs["num_stages"] == 2
    kwargs["num_stages"] = 1
    assert not common.fewer_stages(OutOfResources(1, 0, "shared memory"), kwargs, "a test kernel")  # none left
    kwargs["num_stages"] = 3
    assert not common.fewer_stages(OutOfResources(1, 0, "registers"), kwargs, "a test kernel")
    assert not common.fewer_stages(ValueError("other"), kwargs, "a test kernel") and kwargs["num_stages"] == 3


@pytest.mark.parametrize("family", ["int4", "w8a16", "w8a8"])
def test_launchers_retry_with_fewer_stages(family, monkeypatch):
    """Each family's launch, told by triton that its tiles need more shared memory than the device has, runs again
    with one pipeline stage fewer, and the right result comes back."""
    from triton.runtime.errors import OutOfResources

    module, kernel_name, scheme_name, path = {
        "int4": (int4, "int4_linear_kernel", "int4-g32", "splitk"),
        "w8a16": (w8a16, "w8a16_linear_kernel", "int8", "splitk"),
        "w8a8": (w8a8, "w8a8_linear_kernel", "w8a8", None),
    }[family]
    kernel, stages = getattr(module, kernel_name), []

    class TooBigOnce:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                stages.append(kwargs["num_stages"])
                if len(stages) == 1:
                    raise OutOfResources(150000, 101376, "shared memory")
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(module, kernel_name, TooBigOnce())
    qweight, scales, zeros = packed(scheme_name, 48, 96)
    x = activation(6, 96, torch.float32)
    config = autotune.KernelConfig(16, 16, 32, split_k=2, num_stages=3)
    extra = {} if path is None else {"path": path}
    y = getattr(module, f"{family}_linear")(x, qweight, scales, zeros, None, scheme_name, config=config, **extra)
    assert stages == [3, 2]
    assert_matches_reference(y, x, qweight, scales, zeros, None, scheme_name, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_code_bits_are_exact_floats(dtype):
    """``CODE_BITS | c`` is the 16-bit float ``base + c`` for every nibble (checked with torch's own bit casts, as
    the interpreter has no bf16 ones), and ``CODE_BITS + 8`` is ``base + 8``, the symmetric offset."""
    bits = int4.CODE_BITS[dtype]
    codes = torch.arange(16, dtype=torch.int16)
    values = (codes | bits).view(dtype).double()
    base = torch.tensor([bits], dtype=torch.int16).view(dtype).double()
    assert torch.equal(values - base, codes.double())
    assert torch.tensor([bits + 8], dtype=torch.int16).view(dtype).double() == base + 8
    assert int4.code_dtype(torch.float32) is None


def test_int4_word_dots_in_the_candidates():
    """The GEMV path also tries 16-row word-form dots; every dot path tries words and bytes."""
    gemv = int4.candidate_configs("gemv", 2, 4096, 128)
    assert any(c.block_m == 16 and c.words for c in gemv) and any(c.block_m == 2 for c in gemv)
    gemm = int4.candidate_configs("gemm", 256, 4096, 128)
    assert any(c.words and c.block_m > 64 for c in gemm) and any(not c.words and not c.dequant for c in gemm)


@pytest.mark.parametrize("scheme_name,k", [("int4-g32", 90), ("int4-g8-sym", 90), ("int4", 90)])
def test_int4_words_dequantize_and_fallback(scheme_name, k):
    """The dequantize kernel with words; per-channel int4 with 45-byte rows cannot use words and falls back."""
    qweight, scales, zeros = packed(scheme_name, N_RAGGED, k)
    x = activation(5, k, torch.float32)
    config = dataclasses.replace(candidates.DEQUANT_CONFIG, words=1)
    y = int4.int4_linear(x, qweight, scales, zeros, None, scheme_name, path="gemm", config=config)
    assert_matches_reference(y, x, qweight, scales, zeros, None, scheme_name, 1e-5)


@pytest.mark.parametrize("split_k", [2, 3, 8])
def test_split_k_leaves_its_workspace_zeroed(split_k):
    """The last split of each tile stores the total and zeroes its workspace tile and counter."""
    qweight, scales, zeros = packed("int4-g32", N_RAGGED, 96)
    x = activation(3, 96, torch.float32)
    config = autotune.KernelConfig(4, 16, 32, split_k=split_k)
    first = int4.int4_linear(x, qweight, scales, zeros, None, "int4-g32", path="gemv", config=config)
    work, counts = common.split_workspace(x.device, 3 * N_RAGGED, 1)
    assert not work.any() and not counts.any()
    second = int4.int4_linear(x, qweight, scales, zeros, None, "int4-g32", path="gemv", config=config)
    for y in (first, second):  # the order of the atomic adds may differ between launches on a GPU
        assert_matches_reference(y, x, qweight, scales, zeros, None, "int4-g32", 1e-5)
    y = w8a16.w8a16_linear(x, *packed("int8", N_RAGGED, 96)[:2], None, None, "int8", path="splitk",
                           config=autotune.KernelConfig(16, 16, 16, split_k=split_k))  # fmt: skip
    assert not work.any() and not counts.any()
    assert_matches_reference(y, x, *packed("int8", N_RAGGED, 96)[:2], None, None, "int8", 1e-5)


@pytest.mark.parametrize("scheme_name", ["int8", "fp8"])
@pytest.mark.parametrize("path", ["gemv", "splitk", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", [(1, 64, 32), (17, 90, N_RAGGED)])
def test_w8a16(scheme_name, path, dtype, m, k, n):
    qweight, scales, zeros = packed(scheme_name, n, k)
    x = activation(m, k, dtype)
    bias = torch.randn(n).to(DEVICE) if m > 1 else None
    y = w8a16.w8a16_linear(x, qweight, scales, zeros, bias, scheme_name, path=path)
    assert_matches_reference(y, x, qweight, scales, zeros, bias, scheme_name, tolerance_for(dtype))


@pytest.mark.parametrize("scheme_name", ["int8", "fp8"])
def test_w8a16_dequantize_then_dense_config(scheme_name):
    qweight, scales, zeros = packed(scheme_name, N_RAGGED, 90)
    x = activation(5, 90, torch.float32)
    y = w8a16.w8a16_linear(x, qweight, scales, zeros, None, scheme_name, path="gemm", config=candidates.DEQUANT_CONFIG)
    assert_matches_reference(y, x, qweight, scales, zeros, None, scheme_name, 1e-5)


@pytest.mark.parametrize("scheme_name", ["int8", "fp8"])
@pytest.mark.parametrize("m,k", [(1, 96), (3, 96), (1, 90)])
def test_w8a16_words(scheme_name, m, k):
    """int32-word loads of the 8-bit codes (4 planes a tile); K=90 rows cannot be read as words and fall back."""
    qweight, scales, zeros = packed(scheme_name, N_RAGGED, k)
    x = activation(m, k, torch.float32)
    for split_k in (1, 2):
        config = autotune.KernelConfig(common.m_bucket(m), 16, 32, split_k=split_k, words=1)
        y = w8a16.w8a16_linear(x, qweight, scales, zeros, None, scheme_name, path="gemv", config=config)
        assert_matches_reference(y, x, qweight, scales, zeros, None, scheme_name, 1e-5)


@pytest.mark.parametrize("scheme_name", ["w8a8", "fp8-w8a8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_w8a8(scheme_name, dtype, m, k, n):
    qweight, scales, zeros = packed(scheme_name, n, k)
    x = activation(m, k, dtype)
    bias = torch.randn(n).to(DEVICE) if m != 1 else None
    y = w8a8.w8a8_linear(x, qweight, scales, zeros, bias, scheme_name)
    assert_matches_reference(y, x, qweight, scales, zeros, bias, scheme_name, 1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("scheme_name", ["w8a8", "fp8-w8a8"])
@pytest.mark.parametrize("split_k", [2, 3])
def test_w8a8_split_k(scheme_name, split_k):
    m, k, n = 3, 200, N_RAGGED
    qweight, scales, zeros = packed(scheme_name, n, k)
    x = activation(m, k, torch.float32)
    bias = torch.randn(n).to(DEVICE)
    config = autotune.KernelConfig(16, 16, 32, split_k=split_k)
    y = w8a8.w8a8_linear(x, qweight, scales, zeros, bias, scheme_name, config=config)
    assert_matches_reference(y, x, qweight, scales, zeros, bias, scheme_name, 1e-5)


@pytest.mark.parametrize("to_fp8", [False, True])
def test_activation_quantization_is_bit_exact(to_fp8):
    from qcompile.schemes.fp8 import quantize_rowwise_fp8
    from qcompile.schemes.w8a8 import quantize_per_token_int8

    x = activation(4, 300, torch.float32) * 50
    x[1] = 0.0  # a zero row keeps scale 1
    x[2, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 125.9, 127.99, 1e-4]).to(DEVICE)  # ties, binade carries
    q, x_scale = w8a8.quantize_rows(x, to_fp8)
    ref_q, ref_scale = (quantize_rowwise_fp8 if to_fp8 else quantize_per_token_int8)(x)
    assert torch.equal(x_scale, ref_scale.reshape(-1))
    assert torch.equal(q.float(), ref_q.float())


# -- the path table, tuning and cache: pure Python -------------------------------------------------------------------
@pytest.mark.parametrize(
    "scheme_name,m,capability,expected",
    [
        ("int4-g128", 1, (9, 0), "triton-int4-gemv"),
        ("int4-g128-sym", 16, (9, 0), "triton-int4-splitk"),
        ("int4", 2048, (8, 0), "triton-int4-gemm"),
        ("int8", 4, (9, 0), "triton-w8a16-gemv"),
        ("fp8", 64, (9, 0), "triton-w8a16-gemm"),
        ("fp8", 64, (8, 0), None),
        ("w8a8", 1, (8, 0), "triton-w8a8-gemm"),
        ("fp8-w8a8", 256, (8, 9), "triton-w8a8-gemm"),
        ("fp8-w8a8", 256, (8, 6), None),
        ("int8-g128", 1, (9, 0), None),
        ("nf4-g64", 1, (9, 0), None),
    ],
)
def test_path_table(scheme_name, m, capability, expected):
    assert paths.select_path(parse_scheme(scheme_name), m, capability=capability) == expected


def test_path_reasons_name_the_problem():
    row = paths.PATHS[0]
    assert "CUDA" in paths.path_reason(row, parse_scheme("int4-g128"), 1, "cpu", (0, 0), torch.float32)
    assert "M=8" in paths.path_reason(row, parse_scheme("int4-g128"), 8, "cuda", (9, 0), torch.float16)
    assert "8.9" in paths.path_reason(paths.PATHS[-1], parse_scheme("fp8-w8a8"), 8, "cuda", (8, 0), torch.float16)


def test_register_adds_cuda_rows_only():
    from qcompile.runtime import dispatch

    dispatch.load_builtin_kernels()
    rows = [k for k in dispatch.registered_kernels() if k.name.startswith("triton-")]
    assert {p.name for p in paths.PATHS} <= {k.name for k in rows}  # other families add rows of their own
    assert all(k.device_type == "cuda" for k in rows)


def test_aligned_block_k():
    assert int4.aligned_block_k(128, 128, True) == (128, True)
    assert int4.aligned_block_k(128, 96, True) == (32, True)
    assert int4.aligned_block_k(64, 8, True) == (64, False)
    assert int4.aligned_block_k(64, 8, False) == (8, True)


def test_tuned_configs_round_trip(tmp_path):
    store = autotune.TunedConfigs(tmp_path / "tuned.json")
    config = autotune.KernelConfig(64, 128, 64, split_k=1, num_warps=8, num_stages=3)
    store.put("int4-gemm|m64|n4096|k4096|g128|H100|triton-3.7.1", config)
    exported = autotune.TunedConfigs(tmp_path / "tuned.json").export()  # read back from disk
    assert exported["configs"]["int4-gemm|m64|n4096|k4096|g128|H100|triton-3.7.1"] == config.to_dict()
    fresh = autotune.TunedConfigs(None)
    fresh.update(autotune._parse(exported, "test"), persist=False)
    assert fresh.get("int4-gemm|m64|n4096|k4096|g128|H100|triton-3.7.1") == config
    with pytest.raises(ValueError, match="unknown fields"):
        autotune.KernelConfig.from_dict({"block_m": 16, "blocks": 2})
    with pytest.raises(ValueError, match="power of two"):
        autotune.KernelConfig(48, 64, 64)
    newer = {"format": autotune.FORMAT_VERSION, "configs": {"a": {"block_m": 16, "block_n": 64, "block_k": 64,
                                                                     "words": 3}, "b": config.to_dict()}}  # fmt: skip
    with pytest.warns(UserWarning, match="newer qcompile"):  # a newer writer's rows are skipped, the rest kept
        assert autotune._parse(newer, "test") == {"b": config}


def test_choose_config_without_gpu_uses_default():
    default = autotune.KernelConfig(16, 32, 32)
    chosen = autotune.choose_config("k", [autotune.KernelConfig(64, 64, 64)], default, None, torch.device("cpu"))
    assert chosen == default


def test_search_picks_the_fastest_candidate_that_agrees_with_the_default(caplog):
    """The tuner's search on real launches (interpreter), with a fake clock: a candidate that raises is skipped,
    one with a wrong result is dropped with a warning however fast, and the fastest of the rest wins."""
    qweight, scales, zeros = packed("int4-g32", 48, 64)
    x = activation(1, 64, torch.float32)
    default = autotune.KernelConfig(1, 16, 32)
    good_slow, good_fast = autotune.KernelConfig(1, 32, 32, split_k=2), autotune.KernelConfig(1, 16, 32, split_k=2)
    wrong, broken = autotune.KernelConfig(1, 32, 64), autotune.KernelConfig(2, 16, 32)

    def launch(config):
        if config == broken:
            raise RuntimeError("out of shared memory")
        y = int4.int4_linear(x, qweight, scales, zeros, None, "int4-g32", path="gemv", config=config)
        return y * 1.5 if config == wrong else y

    clock = {good_slow: 3.0, good_fast: 2.0, wrong: 1.0}
    best, timings = autotune.search("k", [good_slow, wrong, broken, good_fast], default, launch,
                                    lambda fn: clock[fn.args[0]])  # fmt: skip
    assert best == good_fast
    assert {config for _, config in timings} == {good_slow, good_fast}
    assert any("drops" in record.message for record in caplog.records)
    assert autotune.search("k", [wrong, broken], default, launch, lambda fn: 1.0)[0] == default


def test_candidate_configs_respect_kernel_constraints():
    for path in ("gemv", "splitk", "gemm"):
        for m in (1, 4, 16, 64, 2048):
            if common.path_for_m(m) != path and path != "gemm":
                continue
            for config in int4.candidate_configs(path, m, 4096):
                assert path == "gemv" or (config.block_k >= 32 and config.block_m >= 16)
    assert {c.split_k for c in w8a8.candidate_configs(16, 4096)} >= {1, 4, 8}  # small M splits K
    assert all(c.split_k == 1 for c in w8a8.candidate_configs(256, 4096))
