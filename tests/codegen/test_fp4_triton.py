"""The Triton FP4 kernels (``mxfp4``, ``nvfp4``) against a float64 reference written from the packed layout.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` on small CPU tensors (set here before triton is
imported). The reference decodes codes and scales from their definitions (E2M1 levels, E8M0 ``2^(s-127)``, torch's
own float8 e4m3 conversion), rotates with a Hadamard built by Kronecker products and quantizes activations with
a nearest-level search, all in float64.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from qcompile.codegen.triton import autotune, common, fp4  # noqa: E402

INTERPRETED = common.interpreting()
DEVICE = "cpu" if INTERPRETED else "cuda"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)
if INTERPRETED and type(fp4.fp4_linear_kernel).__name__ != "InterpretedFunction":
    pytest.skip("triton kernels were created before TRITON_INTERPRET=1 was set", allow_module_level=True)
pytestmark = pytest.mark.triton

LEVELS = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
GROUP = {"mxfp4": 32, "nvfp4": 16}


def scheme_missing(family: str) -> bool:
    return importlib.util.find_spec(f"qcompile.schemes.{family}") is None


# -- float64 reference from the layout ----------------------------------------------------------------------------
def e2m1(codes: torch.Tensor) -> torch.Tensor:
    """float64 value of 4-bit codes: bit 3 sign, bits 0-2 index the levels."""
    codes = codes.long()
    return torch.where(codes >= 8, -1.0, 1.0).double() * LEVELS[codes & 7]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``[N, Kp]`` codes → uint8 ``[N, Kp / 2]``: element 2j low nibble, 2j + 1 high nibble."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def make_packed(family: str, n: int, k: int, seed: int = 0, codes=None, scales=None, rotation=None):
    """Random codes (zero in the padding columns) and scales in the family's layout; K padded to whole groups
    and whole Hadamard blocks."""
    g = torch.Generator().manual_seed(seed)
    group = GROUP[family]
    unit = max(group, rotation or 1)
    kp = math.ceil(k / unit) * unit
    if codes is None:
        codes = torch.randint(0, 16, (n, kp), generator=g)
        codes[:, k:] = 0
    if scales is None:
        if family == "mxfp4":
            scales = torch.randint(120, 131, (n, kp // group), generator=g).to(torch.uint8)
        else:
            scales = (torch.rand(n, kp // group, generator=g) * 3 + 0.01).to(torch.float8_e4m3fn)
    out = [pack_nibbles(codes), scales]
    if family == "nvfp4":
        out.append(torch.tensor([0.37], dtype=torch.float32))
    return [t.to(DEVICE) for t in out]


def dequantize64(family: str, packed: list[torch.Tensor]) -> torch.Tensor:
    """float64 ``[N, Kp]`` weight from the packed tensors."""
    qweight, scales = packed[0].cpu().long(), packed[1].cpu()
    codes = torch.stack([qweight & 15, qweight >> 4], dim=-1).reshape(qweight.shape[0], -1)
    if family == "mxfp4":
        scale = torch.pow(2.0, scales.double() - 127)
    else:
        scale = scales.double() * packed[2].cpu().double()
    return e2m1(codes) * scale.repeat_interleave(GROUP[family], dim=1)


def hadamard64(h: int) -> torch.Tensor:
    matrix = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(int(math.log2(h))):
        matrix = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), matrix)
    return matrix / math.sqrt(h)


def nearest_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Each value of ``v`` on the E2M1 grid: nearest level, ties to the even code, magnitudes above 6 to 6."""
    magnitude = v.abs().clamp(max=6.0)
    distance = (magnitude[..., None] - LEVELS).abs()
    best = distance.min(dim=-1, keepdim=True).values
    candidates = torch.where(distance == best, torch.arange(8), 99)
    even = torch.where(candidates % 2 == 0, candidates, 99).min(dim=-1).values
    index = torch.where(even < 99, even, candidates.min(dim=-1).values)
    return torch.sign(v) * LEVELS[index]


def quantize_activations64(x: torch.Tensor, family: str) -> torch.Tensor:
    """float64 fake-quantized ``x [M, Kp]`` per token per group, from the format definitions."""
    group = GROUP[family]
    blocks = x.reshape(x.shape[0], -1, group)
    amax = blocks.abs().amax(-1, keepdim=True)
    if family == "mxfp4":
        exponent = torch.floor(torch.log2(torch.where(amax > 0, amax, 1.0))) - 2
        scale = torch.pow(2.0, exponent)
        return (nearest_e2m1(blocks / scale) * scale).reshape(x.shape)
    gx = (x.abs().amax(-1, keepdim=True)[..., None] / (448 * 6)).float().double()  # an fp32 scale, as stored
    gx = torch.where(gx > 0, gx, 1.0)
    block_scale = (amax / 6 / gx).clamp(max=448).to(torch.float8_e4m3fn).double()
    divisor = block_scale * gx
    codes = torch.where(divisor > 0, nearest_e2m1(blocks / torch.where(divisor > 0, divisor, 1.0)), 0.0)
    return (codes * divisor).reshape(x.shape)


def reference64(x, packed, bias, fmt: fp4.Fp4Format) -> torch.Tensor:
    """``y = act(x_p) @ W_p.T + bias`` in float64 (``x_p``: x zero-padded to Kp; ``act``: rotate, quantize as the
    format says; ``W_p``: the stored ``[N, Kp]`` weight, in the rotated basis with a rotation)."""
    k = x.shape[-1]
    weight = dequantize64(fmt.family, packed)
    kp = weight.shape[1]
    x64 = torch.nn.functional.pad(x.detach().cpu().double().reshape(-1, k), (0, kp - k))
    if fmt.rotation is not None:
        h = fmt.rotation
        x64 = (x64.reshape(x64.shape[0], -1, h) @ hadamard64(h)).reshape(x64.shape[0], kp)
    if fmt.activations:
        x64 = quantize_activations64(x64, fmt.family)
    y = x64 @ weight.T
    if bias is not None:
        y = y + bias.cpu().double()
    return y.reshape(*x.shape[:-1], -1)


def activation(m: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(dtype).to(DEVICE)


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.cpu().double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


# -- decoding: every code and scale ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["mxfp4", "nvfp4"])
def test_every_code_and_scale_decodes_exactly(family):
    """An identity activation reads the dequantized weight back: all 16 codes against every E8M0 byte in
    ``[64, 190]`` or every finite positive and negative E4M3 value (subnormals included); exact up to the one
    fp32 rounding of the nvfp4 tensor scale's product."""
    group = GROUP[family]
    if family == "mxfp4":
        scale_values = torch.arange(64, 191, dtype=torch.uint8)
    else:
        bits = torch.cat([torch.arange(0, 0x7F), torch.arange(0x80, 0xFF)]).to(torch.uint8)
        scale_values = bits.view(torch.float8_e4m3fn)
    n = scale_values.numel()
    k = 2 * group
    codes = torch.arange(k).remainder(16).repeat(n, 1)
    codes = (codes + torch.arange(n)[:, None]) % 16  # every code meets every scale
    scales = torch.stack([scale_values, scale_values.roll(1)], dim=1)
    packed = make_packed(family, n, k, codes=codes, scales=scales)
    x = torch.eye(k, dtype=torch.float32, device=DEVICE)
    y = fp4.fp4_linear(x, packed, None, fp4.Fp4Format(family, group), config=autotune.KernelConfig(16, 32, 32))
    expected = dequantize64(family, packed).T.float()
    assert torch.equal(y.cpu(), expected), (y.cpu() - expected).abs().max()


# -- the GEMM against the reference ------------------------------------------------------------------------------
CASES = [
    # family, rotation, w4a4, dtype, m, k, bias
    ("mxfp4", None, False, torch.float32, 1, 96, False),
    ("mxfp4", None, False, torch.float16, 17, 70, True),
    ("mxfp4", 32, False, torch.float32, 5, 70, True),
    ("mxfp4", None, True, torch.float32, 5, 96, False),
    ("mxfp4", 32, True, torch.float16, 1, 70, True),
    ("mxfp4", 64, True, torch.float32, 17, 96, False),
    ("mxfp4", 128, False, torch.bfloat16, 1, 70, False),
    ("nvfp4", None, False, torch.float32, 5, 70, True),
    ("nvfp4", None, False, torch.float16, 1, 96, False),
    ("nvfp4", 16, False, torch.float16, 17, 96, False),
    ("nvfp4", None, True, torch.float32, 17, 70, True),
    ("nvfp4", 16, True, torch.float32, 1, 96, True),
    ("nvfp4", 32, True, torch.float16, 5, 70, False),
    ("nvfp4", None, True, torch.bfloat16, 5, 96, True),
]


@pytest.mark.parametrize("family,rotation,w4a4,dtype,m,k,with_bias", CASES)
def test_fp4_linear_matches_float64_reference(family, rotation, w4a4, dtype, m, k, with_bias):
    """Both paths (M <= 16 splits K in two; M = 17 is the tile path), ragged K (70: padding inside the last
    group; with a Hadamard block of 128, K = 70 pads to 128), ragged N (48 over 32-column tiles), bias or none,
    fp32, fp16 and bf16 activations."""
    n = 48
    fmt = fp4.Fp4Format(family, GROUP[family], rotation, w4a4)
    packed = make_packed(family, n, k, rotation=rotation)
    x = activation(m, k, dtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE) if with_bias else None
    y = fp4.fp4_linear(x, packed, bias, fmt)
    assert y.shape == (m, n) and y.dtype == dtype and y.device.type == DEVICE
    error = relative_error(y, reference64(x, packed, bias, fmt))
    assert error < TOLERANCE[dtype], f"{fmt}: relative error {error:.2e}"


@pytest.mark.parametrize("family", ["mxfp4", "nvfp4"])
def test_bfloat16_batched_and_split_configs(family):
    """bf16 activations with leading batch dims; one split, three splits (the last one short) and a 64-deep
    tile all give the reference result."""
    fmt = fp4.Fp4Format(family, GROUP[family])
    packed = make_packed(family, 40, 160, seed=3)
    x = activation(6, 160, torch.bfloat16).reshape(2, 3, 160)
    ref = reference64(x, packed, None, fmt)
    for config in (autotune.KernelConfig(16, 32, 32), autotune.KernelConfig(16, 32, 32, split_k=3),
                   autotune.KernelConfig(16, 16, 64, split_k=2)):  # fmt: skip
        y = fp4.fp4_linear(x, packed, None, fmt, config=config)
        assert y.shape == (2, 3, 40) and y.dtype == torch.bfloat16
        assert relative_error(y, ref) < TOLERANCE[torch.bfloat16], config.label


# -- the activation quantizer ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["mxfp4", "nvfp4"])
def test_activation_quantizer_matches_definition(family):
    """The w4a4 quantize kernel against the float64 definition, exactly: random rows, a zero row, a row that for
    mxfp4 is all exact ties (0.25, 0.75, ... 5 times a power of two: ties go to even codes, checked by hand too),
    values that saturate at 6."""
    group = GROUP[family]
    kp = 4 * group
    x = torch.randn(4, kp, generator=torch.Generator().manual_seed(5)) * 3
    x[1] = 0
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -1.75, -5.0, 4.0, 0.1])
    x[2] = torch.cat([ties, torch.zeros(kp - ties.numel())]) * 0.125
    x[3, :group] = torch.linspace(-7.9, 7.9, group)  # amax 7.9: scale 1 (mx); saturation at 6
    x[3, group:] = torch.randn(kp - group, generator=torch.Generator().manual_seed(6)) * 1e-3
    q, row_scale = fp4.quantize_activations(x.to(DEVICE), kp, fp4.Fp4Format(family, group, None, True),
                                            torch.float32)  # fmt: skip
    got = q.cpu().double() * (1.0 if row_scale is None else row_scale.cpu().double()[:, None])
    expected = quantize_activations64(x.double(), family)
    assert torch.equal(got, expected), (got - expected).abs().max()
    if family == "mxfp4":  # the ties row by hand: amax 0.625 -> scale 2^-3; x / scale = the ties above
        hand = torch.tensor([0, 1, 1, 2, 2, 4, 4, -0.0, -2, -4, 4, 0]) * 0.125
        assert torch.equal(got[2, :12], hand.double())


def test_activation_quantizer_keeps_ragged_rows():
    """K = 70 activations quantized over Kp = 96: the padding columns are zero codes."""
    x = activation(3, 70, torch.float16)
    q, _ = fp4.quantize_activations(x, 96, fp4.Fp4Format("mxfp4", 32, None, True), torch.float16)
    assert q.shape == (3, 96) and q.dtype == torch.float16
    assert torch.all(q[:, 70:] == 0)
    padded = torch.nn.functional.pad(x.cpu().double(), (0, 26))
    assert torch.equal(q.cpu().double(), quantize_activations64(padded, "mxfp4"))


# -- bad input ---------------------------------------------------------------------------------------------------
def test_bad_packed_tensors_are_refused_by_name():
    x = activation(2, 70, torch.float32)
    fmt = fp4.Fp4Format("nvfp4", 16)
    packed = make_packed("nvfp4", 48, 70)
    with pytest.raises(ValueError, match=r"takes 3 packed tensors .*got 2"):
        fp4.fp4_linear(x, packed[:2], None, fmt)
    with pytest.raises(ValueError, match=r"scales is uint8\[48, 5\], expected float8_e4m3fn\[48, 5\]"):
        fp4.fp4_linear(x, [packed[0], packed[1].view(torch.uint8), packed[2]], None, fmt)
    with pytest.raises(ValueError, match=r"qweight is uint8\[48, 32\], expected uint8\[48, 40\]"):
        fp4.fp4_linear(x, [packed[0][:, :32], packed[1], packed[2]], None, fmt)
    with pytest.raises(ValueError, match=r"bias is \[47\], expected \[48\]"):
        fp4.fp4_linear(x, packed, torch.zeros(47, device=DEVICE), fmt)
    with pytest.raises(ValueError, match=r"qweight is uint8\[48, 40\], expected uint8\[48, 64\]"):
        fp4.fp4_linear(x, packed, None, fp4.Fp4Format("nvfp4", 16, 128))  # Kp: whole Hadamard blocks
    with pytest.raises(ValueError, match="BLOCK_K a multiple of the group 32"):
        mx = make_packed("mxfp4", 48, 70)
        fp4.fp4_linear(x, mx, None, fp4.Fp4Format("mxfp4", 32), config=autotune.KernelConfig(16, 16, 16))
    with pytest.raises(TypeError, match="activations must be float16, bfloat16 or float32"):
        fp4.fp4_linear(x.double(), packed, None, fmt)
    with pytest.raises(ValueError, match="is a fp8 scheme, expected one of"):
        fp4.fp4_linear(x, packed, None, "fp8")
    with pytest.raises(ValueError, match="family must be one of"):
        fp4.Fp4Format("int4", 32)
    with pytest.raises(ValueError, match="rotation must be a power of two"):
        fp4.Fp4Format("mxfp4", 32, 48)


@pytest.mark.parametrize("h", [16, 32, 64, 128])
def test_rotations_are_the_block_hadamard(h):
    """Both forms of the launcher's rotation (cached matrix; butterflies, used while tracing) against Kronecker
    products of [[1, 1], [1, -1]], on a ragged K padded to two blocks."""
    x = torch.randn(3, 2 * h - 5, generator=torch.Generator().manual_seed(h)).double()  # fp32 values
    padded = torch.nn.functional.pad(x, (0, 5))
    expected = (padded.reshape(3, 2, h) @ hadamard64(h)).reshape(3, 2 * h)
    assert torch.allclose(fp4.rotate(x.float(), 2 * h, h).double(), expected, rtol=0, atol=2e-6)
    assert torch.allclose(fp4.walsh_hadamard(padded.float(), h).double(), expected, rtol=0, atol=2e-6)


# -- dispatch rows and traced launches ---------------------------------------------------------------------------
def test_kernel_entries_are_cuda_rows_of_both_families():
    for family in ("mxfp4", "nvfp4"):
        (entry,) = fp4.kernel_entries(family)
        assert entry.device_type == "cuda" and set(entry.families) == {"mxfp4", "nvfp4"}
        assert entry.inline is not None
    assert fp4.kernel_entries("int-weight-only") == []

    class Other:
        family, name = "fp8", "fp8"

    class Mx:
        family, name = "mxfp4", "mxfp4"

    x = torch.zeros(1, 64)
    assert "not an FP4 scheme" in fp4.supports(Other(), x, [])
    assert "needs a CUDA tensor" in fp4.supports(Mx(), x, [])


def test_traced_launches_compute_the_op(monkeypatch):
    """In traced mode (what inductor records) both kernels go through ``wrap_triton`` and the result holds."""
    fmt = fp4.Fp4Format("nvfp4", 16, 16, True)
    packed = make_packed("nvfp4", 48, 70)
    x = activation(3, 70, torch.float32)
    wrapped = []
    monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: wrapped.append(kernel.fn.__name__) or kernel)
    with common.traced_launches():
        y = fp4.fp4_linear(x, packed, None, fmt)
    assert wrapped == ["fp4_quantize_kernel", "fp4_linear_kernel"]
    assert relative_error(y, reference64(x, packed, None, fmt)) < TOLERANCE[torch.float32]


# -- against the schemes' own reference ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "mxfp4-had64", "mxfp4-w4a4-had", "nvfp4-w4a4", "nvfp4-w4a4-had32"])
def test_dispatch_row_matches_scheme_reference(name):
    """Weights the scheme itself quantized and packed, through the dispatch row's ``bind`` (launched twice, the
    second time on other activations): the kernel, the scheme's ``reference_linear`` and the float64 reference of
    this file agree."""
    family = name.split("-")[0]
    if scheme_missing(family):
        pytest.skip(f"the {family} scheme is not in this tree")
    from qcompile.schemes import parse_scheme

    scheme = parse_scheme(name)
    n, k = 48, 70
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(7))
    packed = [t.to(DEVICE) for t in scheme.pack(scheme.quantize(weight)).list()]
    bias = torch.randn(n, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    (entry,) = fp4.kernel_entries(family)
    launch = entry.bind(scheme, activation(5, k, torch.float32), packed, bias, n)
    for seed in (1, 2):
        x = activation(5, k, torch.float32, seed=seed)
        y = launch(x, packed, bias)
        ref = scheme.reference_linear(x.cpu(), [t.cpu() for t in packed], bias.cpu(), n)
        assert relative_error(y, ref.double()) < 1e-5
        assert relative_error(y, reference64(x, packed, bias, fp4.fp4_format(scheme))) < 1e-5


# -- what the GPU would run: compiled for sm_90 without one ------------------------------------------------------
COMPILE_SCRIPT = """
import json, torch
from qcompile.codegen.triton import asm, fp4
from qcompile.schemes import parse_scheme
rows = {}
cases = [("mxfp4", 1, torch.bfloat16), ("nvfp4", 1, torch.float16), ("mxfp4-w4a4-had", 256, torch.bfloat16),
         ("nvfp4-w4a4", 8, torch.bfloat16)]
for name, m, dtype in cases:
    scheme = parse_scheme(name)
    packed = scheme.pack(scheme.quantize(torch.randn(256, 512) * 0.05)).list()
    with asm.record(fp4, "fp4_linear_kernel", "fp4_quantize_kernel") as launches:
        fp4.fp4_linear(torch.randn(m, 512, dtype=dtype), packed, None, scheme)
    for launch in launches:
        stats = asm.code_stats(asm.compile_launch(launch))
        mma = sum(count for op, count in stats.loop_opcodes.items() if "MMA" in op)
        rows[f"{name} M={m} {launch.kernel.__name__}"] = {"spills": stats.spills, "shared": stats.shared, "mma": mma}
print(json.dumps(rows))
"""


def test_kernels_compile_for_sm90_without_spills():
    """The launches the launcher makes on a GPU (default configs, both families, both paths, the w4a4 quantizer)
    compile for sm_90 with triton's own ptxas: no register spills, shared memory within an H100's 227 KB, and
    tensor-core MMAs (``HMMA``, or Hopper's ``HGMMA``) in the GEMM's main loop. Runs in a subprocess: this module
    interprets kernels."""
    import subprocess
    import sys

    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton ships no NVIDIA backend tools")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.splitlines()[-1])
    assert len(rows) == 6, rows  # four GEMMs and two quantize kernels
    for label, row in rows.items():
        assert row["spills"] == 0 and row["shared"] <= 227 * 1024, (label, row)
        if "linear" in label:
            assert row["mma"] > 0, (label, row)
