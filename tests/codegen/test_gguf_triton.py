"""The Triton GGUF kernel (``codegen/triton/gguf.py``, ``gguf_kernels.py``) for every ggml block type, against
gguf-py's dequantization (``gguf.quants.dequantize``) in float64 and the scheme's own ``reference_linear``.

Without CUDA the kernel runs under ``TRITON_INTERPRET=1`` on small CPU tensors (set here before triton is
imported). Blocks come from the scheme's own quantizer (``qcompile.schemes.gguf_quantize``) or are random bytes whose
fp16 fields (``d``, ``dmin``, ``m``) are finite values in (-0.05, 0.05) with a zero, a subnormal and a negative
zero among them, so every code, sub-block scale and min occurs. K is ragged (70 over blocks of 32, 300 over blocks
of 256: padding inside the last block), N is ``N_RAGGED``.

Tolerances, ``max |y - ref| / max |ref|`` against float64 math on the weight the reference multiplies (the fp32
dequantization, rounded to the activation's dtype): fp32 ``1e-5`` (fp32 sums; measured 1.5e-7); fp16 ``1e-3`` and
bf16 ``5e-3`` (the fp32 sum rounded once to the output dtype: at most 2**-11 / 2**-8 of the value, i.e. 4.9e-4 /
3.9e-3; measured 4.7e-4 / 3.1e-3). Under the interpreter, bf16 runs fp32 dots on the tile rounded to bf16 in fp32
(its own bf16 casts truncate), so it multiplies the weight a GPU's bf16 dot does.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from qcompile.codegen.triton import autotune, common, gguf, gguf_kernels  # noqa: E402
from qcompile.schemes import parse_scheme  # noqa: E402
from qcompile.schemes.gguf_blocks import BLOCK_TYPES, KVALUES  # noqa: E402
from qcompile.schemes.registry import family  # noqa: E402

from test_triton_kernels import N_RAGGED  # noqa: E402

INTERPRETED = common.interpreting()
DEVICE = "cpu" if INTERPRETED else "cuda"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)
if INTERPRETED and type(gguf_kernels.gguf_linear_kernel).__name__ != "InterpretedFunction":
    pytest.skip("triton kernels were created before TRITON_INTERPRET=1 was set", allow_module_level=True)
pytestmark = pytest.mark.triton

TYPES = list(BLOCK_TYPES)
HALF_FIELDS = ("d", "dmin", "m")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}


def ragged_k(qtype: str) -> int:
    return 70 if BLOCK_TYPES[qtype].qk == 32 else 300


def half_offsets(qtype: str) -> list[int]:
    out, at = [], 0
    for name, size in BLOCK_TYPES[qtype].layout:
        if name in HALF_FIELDS:
            out.append(at)
        at += size
    return out


def make_blocks(qtype: str, n: int, k: int, source: str, seed: int = 0) -> torch.Tensor:
    """``uint8 [n, nb * BYTES]``: the scheme's quantization of a random weight, or random bytes with small finite
    fp16 fields (see the module docstring)."""
    kind = BLOCK_TYPES[qtype]
    if source == "quantizer":
        scheme = parse_scheme(qtype)
        weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
        return scheme.pack(scheme.quantize(weight)).list()[0].to(DEVICE)
    nb = -(-k // kind.qk)
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n * nb, kind.nbytes), dtype=np.uint8)
    for at in half_offsets(qtype):
        halves = rng.uniform(-0.05, 0.05, size=blocks.shape[0]).astype(np.float16)
        halves[:3] = [0.0, 2.0**-24 * 37, -0.0]  # zero, a subnormal, negative zero
        blocks[:, at : at + 2] = halves.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(blocks.reshape(n, -1)).to(DEVICE)


def gguf_weight(qtype: str, blocks: torch.Tensor, k: int) -> torch.Tensor:
    """gguf-py's float32 dequantization of the blocks, ``[N, K]``."""
    values = quants.dequantize(blocks.cpu().numpy(), GGMLQuantizationType[qtype.upper()])
    return torch.from_numpy(np.ascontiguousarray(values.reshape(blocks.shape[0], -1)[:, :k]))


def reference64(qtype: str, blocks, x, bias) -> torch.Tensor:
    """``x @ W.T + bias`` in float64, ``W`` gguf-py's dequantization rounded to the activation's dtype (as the
    scheme's reference rounds its weight); ``x [..., K]``."""
    k = x.shape[-1]
    weight = gguf_weight(qtype, blocks, k).to(x.dtype).double()
    y = x.detach().cpu().double().reshape(-1, k) @ weight.T
    if bias is not None:
        y = y + bias.cpu().double()
    return y.reshape(*x.shape[:-1], -1)


def activation(m: int, k: int, dtype: torch.dtype, seed: int = 1, lead: tuple = ()) -> torch.Tensor:
    return torch.randn(*lead, m, k, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.cpu().double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


# -- the table of types against the block layouts ---------------------------------------------------------------------
def test_type_table_matches_the_block_layouts():
    """Every block type of the scheme is served; each entry's code bytes are the ``qs`` (Q6_K: ``ql``) field of
    ``gguf_blocks``' layout, and its planes fill the block (``QK / QB`` codes a byte)."""
    assert list(gguf.TYPES) == TYPES
    bits = {"q4_0": 4, "q4_1": 4, "q5_0": 4, "q5_1": 4, "q8_0": 8, "q2_k": 2, "q3_k": 2, "q4_k": 4, "q5_k": 4,
            "q6_k": 4, "iq4_nl": 4, "iq4_xs": 4}  # fmt: skip
    for name, entry in gguf.TYPES.items():
        kind = BLOCK_TYPES[name]
        at, fields = 0, {}
        for field, size in kind.layout:
            fields[field] = (at, size)
            at += size
        assert fields["ql" if name == "q6_k" else "qs"] == (entry.qs, entry.qb), name
        assert entry.qb * 8 // bits[name] == kind.qk and kind.qk % entry.qb == 0, name
        assert entry.has_min == ("dmin" in fields or "m" in fields), name


def test_iq4_level_words_hold_kvalues():
    words = gguf_kernels.level_words()
    levels = [((words[q // 4] & 0xFFFFFFFF) >> (8 * (q % 4)) & 255) - 127 for q in range(16)]
    assert levels == list(KVALUES)


# -- decoding: every code, scale and min ------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", TYPES)
def test_every_type_decodes_exactly(qtype):
    """An identity activation (fp32, ieee dots: exact) reads the decoded weight back: random blocks against
    gguf-py's float32 dequantization bit for bit, over a ragged K (columns past K are padding, never read)."""
    k, n = ragged_k(qtype), 16
    blocks = make_blocks(qtype, n, k, "random", seed=3)
    x = torch.eye(k, dtype=torch.float32, device=DEVICE)
    qk = BLOCK_TYPES[qtype].qk
    y = gguf.gguf_linear(x, blocks, None, qtype, config=autotune.KernelConfig(64, 16, qk, num_stages=1))
    expected = gguf_weight(qtype, blocks, k).T
    assert torch.equal(y.cpu(), expected), (y.cpu() - expected).abs().max()


# -- the GEMM against the references ----------------------------------------------------------------------------------
MS = (1, 3, 33)  # split-K (M <= 16) and the tile path (M > 16)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def gemm_cases():
    """Three cases a type; across types every M meets every dtype, with and without bias, on both block sources."""
    out = []
    for t, qtype in enumerate(TYPES):
        for c, m in enumerate(MS):
            out.append((qtype, m, DTYPES[(c + t) % 3], (c + t) % 2 == 0, ("quantizer", "random")[(t + c // 2) % 2]))
    return out


@pytest.mark.parametrize("qtype,m,dtype,with_bias,source", gemm_cases())
def test_gemm_matches_references(qtype, m, dtype, with_bias, source):
    k, n = ragged_k(qtype), N_RAGGED
    blocks = make_blocks(qtype, n, k, source, seed=m)
    x = activation(m, k, dtype, seed=m + 1)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE) if with_bias else None
    y = gguf.gguf_linear(x, blocks, bias, qtype)
    assert y.shape == (m, n) and y.dtype == dtype and y.device.type == DEVICE
    error = relative_error(y, reference64(qtype, blocks, x, bias))
    assert error < TOLERANCE[dtype], f"{qtype} M={m} {dtype}: relative error {error:.2e} against gguf-py"
    scheme = parse_scheme(qtype)
    ref = scheme.reference_linear(x.cpu(), [blocks.cpu()], None if bias is None else bias.cpu(), n)
    error = relative_error(y, ref)
    assert error < 2 * TOLERANCE[dtype], f"{qtype} M={m} {dtype}: relative error {error:.2e} against reference_linear"


@pytest.mark.parametrize("qtype", ["q4_0", "q4_k"])
def test_split_and_even_configs_with_batched_rows(qtype):
    """Leading batch dims; one split, three splits (the last one short or empty), a BLOCK_K of two blocks; a K of
    whole tiles (no bounds mask on the activation) beside the ragged one."""
    qk = BLOCK_TYPES[qtype].qk
    for k in (ragged_k(qtype), 4 * qk):
        blocks = make_blocks(qtype, 40, k, "random", seed=k)
        x = activation(6, k, torch.float32, lead=(2,)).reshape(2, 6, k)
        ref = reference64(qtype, blocks, x, None)
        for config in (autotune.KernelConfig(16, 32, qk), autotune.KernelConfig(16, 32, qk, split_k=3),
                       autotune.KernelConfig(16, 16, 2 * qk, split_k=2)):  # fmt: skip
            y = gguf.gguf_linear(x, blocks, None, qtype, config=config)
            assert y.shape == (2, 6, 40) and y.dtype == torch.float32
            assert relative_error(y, ref) < TOLERANCE[torch.float32], (k, config.label)


def test_empty_activation_gives_empty_output():
    blocks = make_blocks("q8_0", 8, 64, "random")
    y = gguf.gguf_linear(torch.zeros(0, 64, device=DEVICE), blocks, None, "q8_0")
    assert y.shape == (0, 8)


# -- bad input --------------------------------------------------------------------------------------------------------
def test_bad_input_is_refused_by_name():
    x = activation(2, 70, torch.float32)
    blocks = make_blocks("q4_0", 45, 70, "random")  # 3 blocks of 18 bytes a row
    with pytest.raises(ValueError, match=r"gguf_linear\(q4_0\): blocks is uint8\[45, 36\], expected uint8\[45, 54\]"):
        gguf.gguf_linear(x, blocks[:, :36], None, "q4_0")
    with pytest.raises(ValueError, match=r"blocks is int8\[45, 54\], expected uint8\[45, 54\]"):
        gguf.gguf_linear(x, blocks.view(torch.int8), None, "q4_0")
    with pytest.raises(ValueError, match=r"\(q4_1\): blocks is uint8\[45, 54\], expected uint8\[45, 60\] \(3 q4_1"):
        gguf.gguf_linear(x, blocks, None, "q4_1")
    with pytest.raises(ValueError, match=r"bias is \[44\], expected \[45\]"):
        gguf.gguf_linear(x, blocks, torch.zeros(44, device=DEVICE), "q4_0")
    with pytest.raises(ValueError, match="takes 1 packed tensor"):
        gguf.bind("q4_0", x, [blocks, blocks], None, 45)
    with pytest.raises(ValueError, match="BLOCK_K a multiple of the block size 256"):
        k_blocks = make_blocks("q4_k", 45, 300, "random")
        gguf.gguf_linear(activation(2, 300, torch.float32), k_blocks, None, "q4_k",
                         config=autotune.KernelConfig(16, 32, 128))  # fmt: skip
    with pytest.raises(TypeError, match="activations must be float16, bfloat16 or float32"):
        gguf.gguf_linear(x.double(), blocks, None, "q4_0")
    with pytest.raises(ValueError, match="is a int-weight-only scheme, expected a gguf one"):
        gguf.gguf_linear(x, blocks, None, "int4-g32")


# -- dispatch rows ----------------------------------------------------------------------------------------------------
def test_the_family_names_the_module_and_its_row_is_cuda_only(monkeypatch):
    assert "qcompile.codegen.triton.gguf" in family("gguf").kernels
    (entry,) = gguf.kernel_entries("gguf")
    assert entry.name == "triton-gguf" and entry.device_type == "cuda" and entry.families == ("gguf",)
    assert entry.inline is not None
    assert gguf.kernel_entries("mxfp4") == []
    scheme, blocks = parse_scheme("q4_k"), make_blocks("q4_k", 8, 256, "random")
    assert "needs a CUDA tensor" in gguf.supports(scheme, torch.zeros(1, 256), [blocks])
    assert "not a gguf scheme" in gguf.supports(parse_scheme("int4-g32"), torch.zeros(1, 256), [blocks])
    monkeypatch.delitem(gguf.TYPES, "q4_k")  # a type the kernel would not decode keeps the other paths
    assert gguf.supports(scheme, torch.zeros(1, 256), [blocks]) == "no Triton kernel for ggml type q4_k"
    with pytest.raises(ValueError, match="no Triton kernel for ggml type q4_k"):
        gguf.gguf_linear(torch.zeros(1, 256, device=DEVICE), blocks, None, "q4_k")


@pytest.mark.parametrize("qtype", ["q4_0", "q4_k", "q6_k", "q8_0"])
def test_dispatch_row_bind_matches_scheme_reference(qtype):
    """The scheme's own blocks through the row's ``bind`` (launched twice, the second time on other activations)."""
    scheme = parse_scheme(qtype)
    k, n = ragged_k(qtype), N_RAGGED
    blocks = make_blocks(qtype, n, k, "quantizer", seed=7)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    (entry,) = gguf.kernel_entries("gguf")
    launch = entry.bind(scheme, activation(5, k, torch.float32), [blocks], bias, n)
    for seed in (1, 2):
        x = activation(5, k, torch.float32, seed=seed)
        y = launch(x, [blocks], bias)
        ref = scheme.reference_linear(x.cpu(), [blocks.cpu()], bias.cpu(), n)
        assert relative_error(y, ref) < TOLERANCE[torch.float32]
        assert relative_error(y, reference64(qtype, blocks, x, bias)) < TOLERANCE[torch.float32]


def test_traced_launches_compute_the_op(monkeypatch):
    """In traced mode (what inductor records) the kernel goes through ``wrap_triton`` and the result holds."""
    blocks = make_blocks("q6_k", N_RAGGED, 300, "random")
    x = activation(3, 300, torch.float32)
    wrapped = []
    monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: wrapped.append(kernel.fn.__name__) or kernel)
    with common.traced_launches():
        y = gguf.gguf_linear(x, blocks, None, "q6_k")
    assert wrapped == ["gguf_linear_kernel"]
    assert relative_error(y, reference64("q6_k", blocks, x, None)) < TOLERANCE[torch.float32]


# -- what the GPU would run: compiled for sm_90 without one -----------------------------------------------------------
COMPILE_SCRIPT = """
import json, torch
from qcompile.codegen.triton import asm, gguf, gguf_kernels
from qcompile.schemes import parse_scheme
rows = {}
for name, m, dtype in [("q4_0", 1, torch.bfloat16), ("q8_0", 256, torch.float16), ("q4_k", 1, torch.float16),
                       ("q6_k", 256, torch.bfloat16), ("iq4_xs", 64, torch.bfloat16)]:
    kind = parse_scheme(name).kind
    blocks = torch.randint(0, 256, (512, 1024 // kind.qk * kind.nbytes), dtype=torch.uint8)
    with asm.record(gguf_kernels, "gguf_linear_kernel") as launches:
        gguf.gguf_linear(torch.randn(m, 1024, dtype=dtype), blocks, None, name)
    (launch,) = launches
    stats = asm.code_stats(asm.compile_launch(launch))
    mma = sum(count for op, count in stats.loop_opcodes.items() if "MMA" in op)
    rows[f"{name} M={m}"] = {"spills": stats.spills, "shared": stats.shared, "mma": mma}
print(json.dumps(rows))
"""


def test_kernels_compile_for_sm90_without_spills():
    """The launches the launcher makes on a GPU (default configs: split-K and tile paths, blocks of 32 and 256,
    fp16 and bf16) compile for sm_90 with triton's own ptxas: no register spills, shared memory within an H100's
    227 KB, and tensor-core MMAs in the main loop. Runs in a subprocess: this module interprets kernels."""
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
    assert len(rows) == 5, rows
    for label, row in rows.items():
        assert row["spills"] == 0 and row["shared"] <= 227 * 1024 and row["mma"] > 0, (label, row)
