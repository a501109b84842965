"""GGUF block kernels (``codegen/cpp/kernels/gguf.h``, ``gguf_linear.h``, ``gguf_gemv.h``; rows in
``codegen/cpp/gguf.py``) on every instruction set this CPU runs, against float64 math from independent definitions:

* the exact float form (``linear_gguf``) and its GEMM path against gguf-py's dequantization
  (``gguf.quants.dequantize``) times the activation;
* the int8-activation form (``linear_gguf_q8``) against its definition: activations quantized per block of the
  weight's block size (d = amax / 127 in float32, codes rounded half to even), then exact products;
* ``dequant_gguf`` against gguf-py bit for bit; the dispatched ``qcompile::linear`` (which form serves which M).

Blocks: Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 from gguf-py's quantizer; the k-quants and IQ4 types (gguf-py cannot
quantize them) random bytes with small finite f16 scales, so every code and sub-block scale occurs.

Tolerances, worst |y - ref| / (|ref| + rms(ref)) measured over these cases on all three ISAs:
* float32 output: <= 2.9e-6 for both forms (float32 sums against float64). We allow 2e-5.
* bfloat16 output: the float32 result rounded once, at most 2**-9 of the value (measured <= 2.6e-3). We allow 2**-8.
  The GEMM path with bfloat16 activations computes as the reference does, on the weight rounded to bfloat16, so
  that is its float64 reference.
* the int8 form against the exact form: rms of the difference <= 1.1% of rms(ref) (the int8 rounding of the
  activations). We allow 3%.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, quants

from qcompile.codegen.cpp import gguf, launch, library
from qcompile.runtime import dispatch
from qcompile.schemes import parse_scheme
from qcompile.schemes.gguf_blocks import BLOCK_TYPES

from cpp_required import skip_reason

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))

TYPES = list(BLOCK_TYPES)
QUANTIZABLE = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")  # by gguf-py
HALF_FIELDS = ("d", "dmin", "m")
ISAS = library.available_isas() if skip_reason() is None else []
N = 37
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2.0**-8}


def ks(qtype: str) -> tuple[int, int]:
    """A K of whole blocks (an odd block count for 32-blocks) and one the blocks pad."""
    return (288, 300) if BLOCK_TYPES[qtype].qk == 32 else (512, 520)


def half_offsets(qtype: str) -> list[int]:
    out, at = [], 0
    for name, size in BLOCK_TYPES[qtype].layout:
        if name in HALF_FIELDS:
            out.append(at)
        at += size
    return out


def make_blocks(qtype: str, n: int, k: int, seed: int, random_bytes: bool = False) -> torch.Tensor:
    """``uint8 [n, nb * BYTES]``: gguf-py's quantization of a random weight (zero past ``k``), or random bytes whose
    f16 fields are values in (-0.05, 0.05)."""
    kind = BLOCK_TYPES[qtype]
    kp = -(-k // kind.qk) * kind.qk
    rng = np.random.default_rng(seed)
    if qtype in QUANTIZABLE and not random_bytes:
        w = rng.standard_normal((n, kp)).astype(np.float32)
        w[:, k:] = 0
        return torch.from_numpy(np.ascontiguousarray(quants.quantize(w, GGMLQuantizationType[qtype.upper()])))
    blocks = rng.integers(0, 256, size=(n * kp // kind.qk, kind.nbytes), dtype=np.uint8)
    for at in half_offsets(qtype):
        halves = rng.uniform(-0.05, 0.05, size=blocks.shape[0]).astype(np.float16)
        blocks[:, at : at + 2] = halves.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(blocks.reshape(n, -1))


def reference_weight(qtype: str, blocks: torch.Tensor, k: int) -> torch.Tensor:
    """gguf-py's dequantization, float64 ``[N, K]``."""
    values = quants.dequantize(blocks.numpy(), GGMLQuantizationType[qtype.upper()])
    return torch.from_numpy(values.reshape(blocks.shape[0], -1)[:, :k].astype(np.float64))


def int8_activations(x: torch.Tensor, qa: int) -> torch.Tensor:
    """The int8 form's activations as float64 ``[M, K]``: per block of ``qa``, d = amax / 127 and
    q = clamp(round_half_even(x / d), -127, 127) in float32 (0 where amax is 0), value q * d."""
    m, k = x.shape
    kp = -(-k // qa) * qa
    blocks = F.pad(x.float(), (0, kp - k)).reshape(m, -1, qa)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.round(blocks / torch.where(d > 0, d, torch.ones_like(d))).clamp(-127, 127) * (d > 0)
    return (q.double() * d.double()).reshape(m, kp)[:, :k]


def inputs(m: int, k: int, dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=generator).to(dtype), torch.randn(N, generator=generator)


def assert_close_to(y: torch.Tensor, ref: torch.Tensor, dtype, what: str) -> None:
    assert y.dtype == dtype and y.shape == ref.shape, what
    rms = ref.pow(2).mean().sqrt().item()
    error = ((y.double() - ref).abs() / (ref.abs() + rms)).max().item()
    assert error <= TOLERANCE[dtype], f"{what}: worst relative error {error:.3g} > {TOLERANCE[dtype]:.3g}"


def cases(qtype: str):
    """(M, K, seed) for every M in 1, 3, 6 (the one-token form of the 32-element types: token groups of 4 and a rest),
    17 (the row-scratch form) and both K of :func:`ks`."""
    return [(m, k, 10 * i + j) for i, m in enumerate((1, 3, 6, 17)) for j, k in enumerate(ks(qtype))]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qtype", TYPES)
def test_exact_form_matches_dequantize_then_linear(qtype, dtype, isa, monkeypatch):
    monkeypatch.setenv(library.ISA_ENV, isa)
    scheme = parse_scheme(qtype)
    for m, k, seed in cases(qtype):
        blocks = make_blocks(qtype, N, k, seed)
        x, bias = inputs(m, k, dtype, seed)
        y = gguf.direct_launcher(scheme, x, N)(x, [blocks], bias)
        ref = x.double() @ reference_weight(qtype, blocks, k).T + bias.double()
        assert_close_to(y, ref, dtype, f"{qtype} {isa} M={m} K={k}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qtype", TYPES)
def test_int8_form_matches_its_definition(qtype, dtype, isa, monkeypatch):
    monkeypatch.setenv(library.ISA_ENV, isa)
    scheme = parse_scheme(qtype)
    qa = BLOCK_TYPES[qtype].qk
    for m, k, seed in cases(qtype):
        blocks = make_blocks(qtype, N, k, seed)
        x, bias = inputs(m, k, dtype, seed)
        w = reference_weight(qtype, blocks, k)
        y = gguf.direct_launcher(scheme, x, N, "linear_gguf_q8")(x, [blocks], bias)
        ref = int8_activations(x, qa) @ w.T + bias.double()
        assert_close_to(y, ref, dtype, f"{qtype} {isa} M={m} K={k}")
        exact = x.double() @ w.T + bias.double()
        drift = (y.double() - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt()
        assert drift <= 0.03, f"{qtype} {isa}: the int8 form is {drift:.3g} (rms) away from the exact form"


@pytest.mark.parametrize("isa", ISAS)
def test_int8_codes_round_half_to_even_and_zero_blocks_stay_zero(isa, monkeypatch):
    """amax 127 makes d = 1, so x = j + 0.5 are exact ties; the second block is all zero (d = 0)."""
    monkeypatch.setenv(library.ISA_ENV, isa)
    k = 64
    blocks = make_blocks("q8_0", 4, k, seed=3)
    x = torch.zeros(1, k)
    x[0, 0] = -127.0
    x[0, 1:9] = torch.tensor([-14.5, -13.5, -12.5, -0.5, 0.5, 1.5, 2.5, 126.5])
    codes = int8_activations(x, 32)[0]
    assert codes[1:9].tolist() == [-14.0, -14.0, -12.0, 0.0, 0.0, 2.0, 2.0, 126.0] and not codes[32:].any()
    y = gguf.direct_launcher(parse_scheme("q8_0"), x, 4, "linear_gguf_q8")(x, [blocks], None)
    torch.testing.assert_close(y.double(), codes[None] @ reference_weight("q8_0", blocks, k).T, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", TYPES)
def test_dequant_is_gguf_py_bit_for_bit(qtype, isa, monkeypatch):
    """Random bytes for every type (every code, scale and min), f16 fields including subnormals, zeros and -0."""
    monkeypatch.setenv(library.ISA_ENV, isa)
    k = ks(qtype)[1]
    blocks = make_blocks(qtype, 40, k, seed=7, random_bytes=True)
    flat = blocks.reshape(-1, BLOCK_TYPES[qtype].nbytes)
    specials = torch.tensor([0x0001, 0x03FF, 0x0000, 0x8000, 0x8001, 0x0400, 0x7BFF, 0x3C00, 0xBC00],
                            dtype=torch.int32)  # fmt: skip
    for i, at in enumerate(half_offsets(qtype)):
        chosen = specials[(torch.arange(flat.shape[0]) + i) % len(specials)]
        pick = torch.arange(flat.shape[0]) % 3 == 0  # a third of the blocks
        flat[pick, at] = (chosen[pick] & 255).to(torch.uint8)
        flat[pick, at + 1] = (chosen[pick] >> 8).to(torch.uint8)
    n0, n1 = 5, 33
    expected = reference_weight(qtype, blocks, k)[n0:n1].float()
    for dtype in (torch.float32, torch.bfloat16):  # bfloat16: the reference's values rounded as torch rounds them
        out = torch.empty(n1 - n0, k, dtype=dtype)
        call = launch.template("dequant_gguf", k, 40, 1, (gguf.type_id(parse_scheme(qtype)), n0, n1), (),
                               dtype == torch.bfloat16)  # fmt: skip
        call.y, call.threads, call.tensors[0] = out.data_ptr(), 2, blocks.data_ptr()
        assert library.kernel("dequant_gguf")(call) == 0
        assert torch.equal(out, expected.to(dtype)), f"{qtype} {isa} {dtype}: {(out.float() - expected).abs().max()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qtype", ["q4_1", "q3_k", "iq4_xs"])
def test_gemm_path_matches_dequantize_then_linear(qtype, dtype, monkeypatch):
    """Slices dequantized to the activation's dtype, then torch's GEMM in that dtype (the reference's own steps)."""
    monkeypatch.setattr(gguf, "GEMM_MIN_TOKENS", 4)
    k = ks(qtype)[1]
    monkeypatch.setattr(gguf, "GEMM_SLICE_BYTES", 4 * k * 7)  # slices of 7 rows, the last one short
    blocks = make_blocks(qtype, N, k, seed=11)
    x, bias = inputs(6, k, dtype, seed=11)
    y = gguf.exact_launcher(parse_scheme(qtype), x, N)(x, [blocks], bias)
    w = reference_weight(qtype, blocks, k)
    if dtype == torch.bfloat16:  # the reference's F.linear in bfloat16: weight and bias rounded to bfloat16
        w, bias = w.float().to(dtype).double(), bias.to(dtype)
    ref = x.double() @ w.T + bias.double()
    assert_close_to(y, ref, dtype, f"{qtype} GEMM path")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kernel", ["linear_gguf", "linear_gguf_q8"])
def test_non_finite_activations_give_nan_rows(kernel, isa, monkeypatch):
    monkeypatch.setenv(library.ISA_ENV, isa)
    blocks = make_blocks("q4_k", 6, 512, seed=8)
    x, _ = inputs(3, 512, torch.float32, seed=8)
    x[0, 300], x[2, 7] = float("nan"), float("inf")
    y = gguf.direct_launcher(parse_scheme("q4_k"), x, 6, kernel)(x, [blocks], None)
    assert y[0].isnan().all() and not y[2].isfinite().any() and y[1].isfinite().all()


@pytest.mark.parametrize("kernel, m", [("linear_gguf", 3), ("linear_gguf_q8", 5), ("linear_gguf", 20)])
def test_one_and_two_threads_agree_exactly(kernel, m):
    scheme = parse_scheme("q5_k")
    blocks = make_blocks("q5_k", 301, 768, seed=5)
    x, _ = inputs(m, 768, torch.float32, seed=5)
    run = gguf.direct_launcher(scheme, x, 301, kernel)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(x, [blocks], None)
        torch.set_num_threads(2)
        two = run(x, [blocks], None)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


# -- the dispatched op ------------------------------------------------------------------------------------------------
def packed_weight(qtype: str, n: int, k: int, seed: int):
    scheme = parse_scheme(qtype)
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return scheme, scheme.pack(scheme.quantize(weight)).list()


def test_family_names_these_rows():
    scheme = parse_scheme("q4_k")
    assert scheme.family == "gguf"
    dispatch.load_family_kernels("gguf")
    names = [row.name for row in dispatch.family("gguf").rows if row.device_type == "cpu"]
    assert names[:2] == ["cpp-gguf-q8", "cpp-gguf"], names


@pytest.fixture
def int8_form(monkeypatch):
    """llama.cpp's int8-activation form switched on (``QCOMPILE_GGUF_Q8=1``; off by default)."""
    monkeypatch.setenv(gguf.Q8_ENV, "1")
    dispatch.forget_choices()
    yield
    monkeypatch.undo()
    dispatch.forget_choices()


def test_the_form_follows_the_token_count(int8_form):
    assert gguf.uses_int8_activations(1) and gguf.uses_int8_activations(gguf.Q8_MAX_TOKENS)
    assert not gguf.uses_int8_activations(gguf.Q8_MAX_TOKENS + 1)
    scheme, packed = packed_weight("q4_k", 24, 300, seed=1)
    for m, expected in ((1, "cpp-gguf-q8"), (gguf.Q8_MAX_TOKENS, "cpp-gguf-q8"), (gguf.Q8_MAX_TOKENS + 1, "cpp-gguf"),
                        (gguf.GEMM_MIN_TOKENS + 3, "cpp-gguf")):  # fmt: skip
        entry, reason = dispatch.select_kernel(scheme, torch.randn(m, 300), packed)
        assert entry is not None and entry.name == expected, (m, reason)
    entry, reason = dispatch.select_kernel(scheme, torch.randn(2, 300, dtype=torch.float16), packed)
    assert entry is None and "float16" in reason


@pytest.mark.parametrize("qtype", ["q4_0", "q5_1", "q2_k", "q6_k"])
def test_op_serves_small_calls_int8_and_large_calls_exact(qtype, int8_form):
    k, n = 288 if BLOCK_TYPES[qtype].qk == 32 else 520, 40
    scheme, packed = packed_weight(qtype, n, k, seed=2)
    w = reference_weight(qtype, packed[0], k)
    bias = torch.randn(n)
    for m in (1, 3, gguf.Q8_MAX_TOKENS + 1, gguf.GEMM_MIN_TOKENS + 5):
        x = torch.randn(1, m, k)
        for _ in range(2):  # the first call of a signature runs in Python, the second through the C++ op's plan
            y = torch.ops.qcompile.linear(x, packed, bias, qtype, k, n)
        xs = int8_activations(x[0], BLOCK_TYPES[qtype].qk) if gguf.uses_int8_activations(m) else x[0].double()
        assert_close_to(y[0], xs @ w.T + bias.double(), torch.float32, f"{qtype} M={m}")


def test_a_large_call_first_does_not_change_the_form_of_small_calls(int8_form):
    """The C++ op keeps one plan per signature whatever M is: it must stay the int8 row's."""
    qtype, k, n = "q4_k", 512, 44
    scheme, packed = packed_weight(qtype, n, k, seed=4)
    x_small = torch.randn(1, k)
    expected = gguf.direct_launcher(scheme, x_small, n, "linear_gguf_q8")(x_small, packed, None)
    torch.ops.qcompile.linear(torch.randn(gguf.Q8_MAX_TOKENS + 2, k), packed, None, qtype, k, n)
    for _ in range(3):
        assert torch.equal(torch.ops.qcompile.linear(x_small, packed, None, qtype, k, n), expected)


def test_the_exact_form_is_the_default_and_the_int8_form_opt_in(monkeypatch):
    qtype, k, n = "iq4_nl", 96, 20
    scheme, packed = packed_weight(qtype, n, k, seed=6)
    x = torch.randn(2, k)
    monkeypatch.delenv(gguf.Q8_ENV, raising=False)
    dispatch.forget_choices()
    entry, _ = dispatch.select_kernel(scheme, x, packed)
    assert entry.name == "cpp-gguf" and not gguf.uses_int8_activations(1)
    for _ in range(2):
        y = torch.ops.qcompile.linear(x, packed, None, qtype, k, n)
    assert_close_to(y, x.double() @ reference_weight(qtype, packed[0], k).T, torch.float32, "exact")
    monkeypatch.setenv(gguf.Q8_ENV, "1")
    dispatch.forget_choices()
    try:
        assert dispatch.select_kernel(scheme, x, packed)[0].name == "cpp-gguf-q8"
    finally:
        monkeypatch.undo()
        dispatch.forget_choices()
