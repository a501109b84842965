"""Every registered family's reference matmul, and the CPU op with whatever kernel serves it, against float64 math
written from the format's published definition (``definitions.py``: the packed tensors decoded there, bit by bit).

Tolerance, per output: ``1e-5 * max|y_def| + slack``. The reference and the kernels round the dequantized weight to
float32 (relative 2**-24 per element) and accumulate K = 197 products in float32: a random-sign sum's error is
about ``sqrt(K) * 2**-24`` of its terms, ~1e-7 of ``max|y|`` (observed at most 1.2e-6), and 1e-5 leaves a margin
while staying far below what one code moves an output by (over 1e-4 of ``max|y|`` here; the planted-bug tests
show it is caught). ``slack`` bounds what activation roundings within ``definitions.TIE`` of a tie may move ``y``
by when they break the other way (zero unless a quantized activation lands on a near-tie).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

import definitions
import fp4_definition
import qcompile  # noqa: F401  (registers torch.ops.qcompile.linear)
from qcompile.runtime import dispatch
from qcompile.runtime.ops import reference_linear
from qcompile.schemes import fp4, mxfp4, nf4, parse_scheme
from qcompile.schemes import fp8 as fp8_module
from qcompile.schemes import integer
from qcompile.schemes.registry import families

#: N odd and two row blocks of 128 (one partial); K not a multiple of 8 nor of any group (16 .. 128) nor of 128
N, K = 131, 197
#: forms besides the families' examples: int2/3/4/8 sym and asym, per channel and grouped; nf4 groups; fp8 per row
#: weight-only and W8A8; w4a8 forms; FP4 rotations and -w4a4
EXTRA = [
    "int8", "int8-asym", "int8-g32", "int8-g64-asym", "int4", "int4-sym", "int4-g32", "int4-g128-sym", "int3",
    "int3-sym", "int3-g64", "int3-g32-sym", "int2", "int2-sym", "int2-g32", "int2-g64-sym",
    "nf4-g32", "nf4-g64", "nf4-g128", "fp8", "fp8-w8a8", "w8a8", "w4a8", "w4a8-g32", "w4a8-g64-sym",
    "fp8-block", "fp8-block-ue8m0", "mxfp4", "mxfp4-had", "mxfp4-had128", "mxfp4-w4a4", "mxfp4-w4a4-had",
    "mxfp4-w4a4-had64", "nvfp4", "nvfp4-had", "nvfp4-had64", "nvfp4-w4a4", "nvfp4-w4a4-had", "nvfp4-w4a4-had32",
]  # fmt: skip
SCHEMES = sorted({*(name for f in families() for name in f.examples), *EXTRA})
ZERO_ROW = 2  # one all-zero token: scale rules fall back to 1, every output is the bias


def _packed(name: str, seed: int = 0):
    scheme = parse_scheme(name)
    weight = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    return scheme, scheme.pack(scheme.quantize(weight)).list()


def _inputs(m: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, K, generator=g)
    x[ZERO_ROW] = 0.0
    return x, torch.randn(N, generator=g)


def _off(y: torch.Tensor, expected: np.ndarray, slack: np.ndarray) -> tuple[np.ndarray, str]:
    """Boolean ``[M, N]`` of outputs off the definition, and a line naming the worst one."""
    got = y.detach().double().numpy()
    tolerance = 1e-5 * np.abs(expected).max() + slack
    error = np.abs(got - expected)
    off = ~(error <= tolerance)  # NaN counts as off
    m, n = np.unravel_index(np.argmax(np.where(np.isnan(error), np.inf, error - tolerance)), error.shape)
    return off, (f"{off.sum()} of {off.size} outputs off the definition; worst y[{m}, {n}] = {got[m, n]!r}, "
                 f"definition {expected[m, n]!r} (|diff| {error[m, n]:.3g}, tolerance {tolerance[m, n]:.3g}, "
                 f"max|y| {np.abs(expected).max():.3g})")  # fmt: skip


@pytest.mark.parametrize("name", SCHEMES)
def test_reference_matches_definition(name):
    scheme, packed = _packed(name)
    x, bias = _inputs(4)
    expected, slack = definitions.linear(scheme, x, packed, bias, N)
    off, line = _off(reference_linear(x, packed, bias, name, K, N), expected, slack)
    assert not off.any(), f"{name} reference: {line}"


@pytest.mark.parametrize("m", [4, 260])  # 260 tokens: the CPU kernels' many-token (dequantize + GEMM) path
@pytest.mark.parametrize("name", SCHEMES)
def test_cpu_op_matches_definition(name, m):
    scheme, packed = _packed(name)
    x, bias = _inputs(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference-path notice where no kernel serves the call
        y = torch.ops.qcompile.linear(x, packed, bias, name, K, N)
        row = dispatch.choose_kernel(name, x, packed, bias, K, N)
    expected, slack = definitions.linear(scheme, x, packed, bias, N)
    off, line = _off(y, expected, slack)
    assert not off.any(), f"{name}, {m} tokens, {getattr(row, 'name', 'reference path')}: {line}"


def test_every_registered_family_has_a_definition():
    """A new family (or a new option of one) fails here until ``definitions.py`` defines it."""
    for family in families():
        assert family.name in definitions.DEFINITIONS, (
            f"family {family.name} has no definition in tests/schemes/definitions.py: write its dequantization (and "
            f"any activation quantization) there from the published format")  # fmt: skip
        fields = {f.name for f in dataclasses.fields(family.scheme)} - {"version"}
        unknown = fields - set(definitions.DEFINITIONS[family.name].options)
        assert not unknown, f"family {family.name}: options {sorted(unknown)} are not in its definition"
        assert set(family.examples) <= set(SCHEMES)


def test_nf4_levels_are_the_published_ones():
    """qcompile's table equals the 16 levels typed in from QLoRA / bitsandbytes, which QLoRA's construction (normal
    quantiles, bitsandbytes ``create_normal_map``) reproduces to bitsandbytes' float32 precision."""
    assert nf4.NF4_LEVELS == definitions.NF4_LEVELS
    np.testing.assert_allclose(definitions.nf4_construction(), definitions.NF4_LEVELS, rtol=0, atol=2e-7)
    assert len(set(definitions.NF4_LEVELS)) == 16 and definitions.NF4_LEVELS[7] == 0.0


def test_4bit_tables_equal_bitsandbytes():
    """The typed-in NF4 table and the FP4 table built from its bits against the peer that published them
    (bitsandbytes ``get_4bit_type``), exactly."""
    functional = pytest.importorskip("bitsandbytes.functional")
    assert functional.get_4bit_type("nf4", device="cpu").tolist() == list(definitions.NF4_LEVELS)
    assert functional.get_4bit_type("fp4", device="cpu").tolist() == definitions.bnb_fp4_levels().tolist()


def test_e4m3_decoding_is_the_format():
    """The bit decoder against the E4M3 value list of ``fp4_definition`` and torch's float8_e4m3fn, all 256 bytes."""
    assert definitions.E4M3_TABLE.tolist() == [v for _, v in fp4_definition.E4M3]
    assert definitions.E4M3_TABLE[-1] == 448.0 and definitions.E4M3_TABLE[1] == 2.0**-9
    every = torch.arange(256, dtype=torch.uint8)
    torch_values = every.view(torch.float8_e4m3fn).double().numpy()
    np.testing.assert_array_equal(definitions.e4m3_decode(every.numpy()), torch_values)


def test_rounding_ties_go_to_even():
    """E2M1 and e4m3 ties to the even bit pattern (OCP), saturation, and int8 round-half-even."""
    rounded, _, step = definitions.round_to_table(np.array([0.25, 0.75, 2.5, 5.0, -1.75, 7.0]), definitions.E2M1_TABLE)
    assert rounded.tolist() == [0.0, 1.0, 2.0, 4.0, -2.0, 6.0] and step.tolist() == [0.5, 0.5, 1, 2, 0.5, 0]
    rounded, _, _ = definitions.round_to_table(np.array([1.0625, 1.1875, 500.0, 2.0**-10]), definitions.E4M3_TABLE)
    assert rounded.tolist() == [1.0, 1.25, 448.0, 0.0]
    assert definitions.round_int(np.array([0.5, 1.5, -2.5, 200.0]), 127)[0].tolist() == [0.0, 2.0, -2.0, 127.0]


@pytest.mark.parametrize("name", [f.examples[-1] for f in families()])
def test_planted_code_flip_is_detected(name):
    """One flipped code bit: the definition reads it where the scheme does (they agree on the perturbed tensors), and
    a reference that read it wrongly would fail exactly at that output column for every non-zero token."""
    scheme, packed = _packed(name)
    x, bias = _inputs(4)
    perturbed = definitions.perturb(packed, row=1, k=K)
    y = reference_linear(x, perturbed, bias, name, K, N)
    assert not _off(y, *definitions.linear(scheme, x, perturbed, bias, N))[0].any()
    off, line = _off(y, *definitions.linear(scheme, x, packed, bias, N))
    expected = np.zeros_like(off)
    expected[[m for m in range(4) if m != ZERO_ROW], 1] = True
    assert (off == expected).all(), f"{name}: a flipped code of row 1 should move column 1 only: {line}"


def _swapped_nibbles(unpack):
    def wrong(packed, bits, k_padded):
        return unpack(((packed >> 4) | (packed << 4)).to(torch.uint8), bits, k_padded)

    return wrong


#: (scheme, module, attribute, replacement factory): bugs planted in the scheme code after packing
BUGS = {
    "int4 nibbles swapped": ("int4-g32", integer, "unpack_codes", lambda old: _swapped_nibbles(old)),
    "fp4 nibbles swapped": ("nvfp4-had", fp4, "unpack_codes", lambda old: _swapped_nibbles(old)),
    "nf4 level mistyped": ("nf4-g64", nf4.NF4, "levels", lambda old: (*old[:12], 0.5627, *old[13:])),
    "fp8-w8a8 activations on e4m3fnuz's 240": ("fp8-w8a8", fp8_module, "E4M3_MAX", lambda old: 240.0),
    "mxfp4 E8M0 bias 128": ("mxfp4-w4a4", mxfp4, "E8M0_BIAS", lambda old: 128),
}


@pytest.mark.parametrize("bug", BUGS)
def test_planted_scheme_bug_is_detected(bug, monkeypatch):
    name, module, attribute, replacement = BUGS[bug]
    scheme, packed = _packed(name)
    x, bias = _inputs(4)
    expected, slack = definitions.linear(scheme, x, packed, bias, N)
    assert not _off(reference_linear(x, packed, bias, name, K, N), expected, slack)[0].any()
    monkeypatch.setattr(module, attribute, replacement(getattr(module, attribute)))
    assert _off(reference_linear(x, packed, bias, name, K, N), expected, slack)[0].any(), f"{bug} went unnoticed"
