"""W4A16: ``int4-gN`` (asymmetric and ``-sym``) weights dequantized in registers right before ``tl.dot``.

Reads the canonical packed layout (``qcompile.schemes.integer`` / ``packing``) directly::

    qweight uint8 [N, K_padded / 2]   element 2j in the low nibble of byte j, element 2j+1 in the high nibble
    scales  float32 [N, G]            G = K_padded / group_size
    zeros   float32 [N, G]            asymmetric: w = (u - zero) * scale;  symmetric (no zeros): w = (u - 8) * scale

The kernels (``int4_kernels.py``): for one to four rows a GEMV without ``tl.dot`` that applies each group's scale
once per tile (bytes, or int32 words at two instructions a nibble); a dot kernel (from five rows, and 16-row
configs of the GEMV path) that feeds ``tl.dot`` the first operand of the transposed product, either the weight
tile dequantized in registers (bytes: ``code * scale - zero * scale``, codes become floats by OR-ing exponent bits,
no int→float conversion) or, in the word form, the exact codes as 16-bit floats with each group's scale applied to
the tile's fp32 product; for large M also dequantize-then-cuBLAS. Columns ``K .. K_padded`` are masked
(``K = x.shape[-1]``).

Order of this file: autotune key, config generators, the launcher (a call signature's bound launches).
"""

from __future__ import annotations

import dataclasses

import torch

from qcompile.codegen.triton import autotune, candidates, common
from qcompile.codegen.triton.int4_kernels import (
    int4_dequantize_kernel,
    int4_gemv_kernel,
    int4_linear_kernel,
    tile_sums_kernel,
)
from qcompile.schemes import IntWeightOnly, as_scheme

#: the tuning key's kernel name, with the kernels' revision: configs tuned for earlier kernels are not reused
KERNEL_NAME = "int4v4"


# -- autotune key -------------------------------------------------------------------------------------------------
def tune_key(path: str, m: int, n: int, k: int, group_size: int, device: torch.device, symmetric: bool = True,
             dot_words: bool = True) -> str:  # fmt: skip
    """The autotune key. Symmetric and asymmetric weights are tuned apart (their word-form costs differ), and so
    are calls whose dots cannot take the word form (``dot_words`` false: fp32 activations, rows not of whole
    words), for which a word-form winner would run as bytes on a tile chosen for words."""
    kernel = f"{KERNEL_NAME}-{path}{'-sym' if symmetric else ''}{'' if dot_words else '-bytes'}"
    return autotune.tune_key(kernel, m, n, k, group_size, device)


# -- config generators --------------------------------------------------------------------------------------------
def candidate_configs(path: str, m: int, k: int, group_size: int | None = None) -> list[autotune.KernelConfig]:
    """The standard candidates (dot paths need ``BLOCK_K >= 32``) in their word forms (int32 words: half the
    instructions of the byte forms or less, sm_90 SASS), plus the byte form of the standard default tile as a
    reference; dequantize tiles with bytes and words; the GEMV path also tries 16-row word-form dots
    (:func:`uses_dot`); dots of 16 rows with 64+ x 128 tiles also split into nibble-pair planes (``words=2``,
    :func:`planes_apply`). With ``group_size``, BLOCK_K becomes what the launch would use (:func:`plan`), word
    forms that would not apply become byte forms (planes are dropped), and duplicates are dropped. A word-form
    config launches the byte form wherever a call cannot use words (fp32 activations in dots, unaligned rows)."""
    out = []
    standard = candidates.standard_candidates(path, m, k)
    reference = candidates.standard_default(path, m)
    if path == "gemv":
        standard += [autotune.KernelConfig(16, bn, 128, split_k=sk, num_stages=3, words=1)
                     for bn in (64, 128) for sk in (2, 4, 8) if k >= 128 * sk]  # fmt: skip
    if not reference.dequant:
        standard.append(reference)
    for config in standard:
        if uses_dot(path, config) and not config.dequant and config.block_k < 32:
            continue
        words = dataclasses.replace(config, words=1)
        planes = ([dataclasses.replace(config, words=2)]
                  if uses_dot(path, config) and config.block_m <= 16 and config.block_n >= 64 and config.block_k >= 128
                  else [])  # fmt: skip
        for variant in [config, words] if config.dequant else [config] if config is reference else [words, *planes]:
            if group_size is not None:
                block_k, _, words_used = plan(path, variant, group_size, True)
                if variant.words and not words_used:
                    if config.dequant or variant.words == 2:
                        continue
                    variant = dataclasses.replace(variant, words=0)
                if variant.words == 2 and not planes_apply(variant, block_k):
                    continue
                variant = dataclasses.replace(variant, block_k=block_k)
            if variant not in out:
                out.append(variant)
    return out


def plan(path: str, config: autotune.KernelConfig, group_size: int, words_ok: bool) -> tuple[int, bool, bool]:
    """``(BLOCK_K, group aligned, words)`` of a launch with ``config``; ``words_ok``: the rows can be read as words
    (and, for the dot kernel, the activations are 16-bit).

    GEMV and dot tiles lie within one group where they can (BLOCK_K shrinks to divide it), so a tile reads one
    scale per row; word forms need such a tile of whole words. Dequantize word tiles may span whole groups (scales
    gathered once per word)."""
    words = bool(config.words) and words_ok
    if config.dequant:
        if words and config.block_k % 8 == 0 and config.block_k > group_size and config.block_k % group_size == 0:
            return config.block_k, False, True
        block_k, aligned = aligned_block_k(config.block_k, group_size, False)
        return block_k, aligned, words and block_k % 8 == 0
    block_k, aligned = aligned_block_k(config.block_k, group_size, uses_dot(path, config))
    return block_k, aligned, words and aligned and block_k % 8 == 0


def planes_apply(config: autotune.KernelConfig, block_k: int) -> bool:
    """Whether a word-form dot splits into one dot per nibble-pair plane: ``words=2``, up to 16 rows (the gathered
    activations cost more with more rows) and K tiles of 64 columns or more (each plane's dot needs 16)."""
    return config.words == 2 and config.block_m <= 16 and block_k >= 64


def uses_dot(path: str, config: autotune.KernelConfig) -> bool:
    """Whether a launch runs the ``tl.dot`` kernel: the split-K and GEMM paths, and GEMV-path configs of 16 rows
    (tensor cores for one to four rows: the word form's dequantization is cheaper than the GEMV's)."""
    return path != "gemv" or config.block_m >= 16


#: bit patterns of the 16-bit float whose spacing is 1 (128.0 in bf16, 1024.0 in fp16), by code dtype
CODE_BITS = {torch.bfloat16: 0x4300, torch.float16: 0x6400}


def code_dtype(x_dtype: torch.dtype) -> torch.dtype | None:
    """The 16-bit float dtype the dot kernel's word form makes codes in (the activation's), or ``None`` (fp32
    activations take bytes). The interpreter has no bf16 bit casts: there codes are fp16 and the dot fp32."""
    if x_dtype == torch.bfloat16 and common.interpreting():
        return torch.float16
    return x_dtype if x_dtype in CODE_BITS else None


def default_config(path: str, m: int, group_size: int | None = None, dot_words: bool = True) -> autotune.KernelConfig:
    """The standard default; on a GPU the word forms (sm_90 SASS, triton 3.7.1: 6 to 11 instructions per weight
    byte against 12 to 27 for bytes). One row: the GEMV in tiles of 128 rows, split 8 ways so that even N = 4096
    gives 256 programs. Two to sixteen rows: the word-form dot, 16 x 128 x 128 tiles split 4 ways. GEMMs: the
    word-form dot with 128-deep K tiles (the scale is applied per tile, after the dot). Where the dot's word form
    would not run (``dot_words`` false: fp32 activations or rows that are not whole words; or groups that the tile
    cannot divide), the standard byte-form defaults, whose 64-deep tiles need half the shared memory."""
    config = candidates.standard_default(path, m)
    if common.interpreting() or config.dequant:
        return config
    if path == "gemv" and m == 1:
        return dataclasses.replace(config, block_n=128, split_k=8, words=1)
    if path != "gemm":
        words = autotune.KernelConfig(16, 128, 128, split_k=4, num_stages=3, words=1)
    else:
        words = dataclasses.replace(config, block_k=128, words=1)
    if group_size is not None and not plan(path, words, group_size, dot_words)[2]:
        return config
    return words


def aligned_block_k(block_k: int, group_size: int, use_dot: bool) -> tuple[int, bool]:
    """``(BLOCK_K, group aligned)``: shrink BLOCK_K to divide the group so each tile reads one scale per column."""
    smallest = 32 if use_dot else 2
    candidate = block_k
    while candidate >= smallest:
        if group_size % candidate == 0:
            return candidate, True
        candidate //= 2
    return block_k, False


# -- launcher -----------------------------------------------------------------------------------------------------
def words_shape(qweight: torch.Tensor, group_size: int) -> bool:
    """Whether packed rows of this shape can be read as int32 words: 8 nibbles per word, groups of whole words (the
    first element's alignment, :func:`common.word_aligned`, is checked per call)."""
    return qweight.shape[1] % 4 == 0 and qweight.stride(0) % 4 == 0 and group_size % 8 == 0


#: asymmetric word-form dots with row tiles above this read the activations' tile sums from a separate launch
TILE_SUMS_MIN_BLOCK_M = 16


def tile_sums(x2: torch.Tensor, k: int, width: int) -> torch.Tensor:
    """``[cdiv(K, width), M]`` fp32 sums of the activation rows over each ``width`` columns (one launch): the
    per-tile sums of the asymmetric word-form dot (``width`` = its BLOCK_K, which divides the group)."""
    tiles = common.cdiv(k, width)
    out = torch.empty((tiles, x2.shape[0]), device=x2.device, dtype=torch.float32)
    block_s = common.next_power_of_2(width)
    block_t = min(max(1, 2048 // block_s), common.next_power_of_2(tiles))
    common.kernel(tile_sums_kernel)[(x2.shape[0], common.cdiv(tiles, block_t))](
        x2, out, x2.shape[0], k, x2.stride(0), WIDTH=width, BLOCK_T=block_t, BLOCK_S=block_s
    )
    return out


@dataclasses.dataclass(frozen=True)
class Call:
    """A call signature: what a launch depends on besides the tensors' addresses."""

    path: str
    m: int
    n: int
    k: int
    group_size: int
    dtype: torch.dtype
    symmetric: bool
    has_bias: bool


class Launch:
    """One config's launch for one call signature: grid and every kernel argument but the tensors, worked out once."""

    def __init__(self, call: Call, cfg: autotune.KernelConfig, words_ok: bool):
        self.call, self.config = call, cfg
        self.use_dot = uses_dot(call.path, cfg)
        codes = code_dtype(call.dtype)
        words_ok = words_ok and (codes is not None or not self.use_dot)
        block_k, aligned, words = plan(call.path, cfg, call.group_size, words_ok)
        meta = dict(GROUP_SIZE=call.group_size, SYMMETRIC=call.symmetric, GROUP_ALIGNED=aligned,
                    EVEN_K=call.k % block_k == 0, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
                    num_warps=cfg.num_warps)  # fmt: skip
        self.dequant = bool(cfg.dequant)
        if self.dequant:
            self.grid = (common.cdiv(call.n, cfg.block_n), common.cdiv(call.k, block_k))
            self.kwargs = dict(meta, WORDS=words)
            return
        self.grid = (common.cdiv(call.m, cfg.block_m) * common.cdiv(call.n, cfg.block_n), cfg.split_k)
        self.kwargs = dict(meta, HAS_BIAS=call.has_bias, SPLIT=cfg.split_k > 1, BLOCK_M=cfg.block_m,
                           num_stages=cfg.num_stages, WORDS=words)  # fmt: skip
        self.sums = self.use_dot and words and not call.symmetric and cfg.block_m > TILE_SUMS_MIN_BLOCK_M
        if self.use_dot:
            codes = codes or torch.float16  # fp32 activations: bytes, the code arguments unused
            self.kwargs.update(
                DOT_DTYPE=common.dot_dtype(call.dtype), DOT_PRECISION=common.dot_precision(call.dtype),
                TILE_SUMS=self.sums, PLANES=words and planes_apply(cfg, block_k), GROUP_M=cfg.group_m,
                CODE_DTYPE=common.tl_dtype(codes),
                CODE_BITS=CODE_BITS[codes],
            )  # fmt: skip
        else:
            self.kwargs.update(EVEN_M=call.m % cfg.block_m == 0)

    def __str__(self) -> str:
        return f"the int4 {'dot' if self.use_dot else 'GEMV'} kernel ({self.config})"

    def __call__(self, x2, qweight, scales, zeros, bias) -> torch.Tensor:
        """``[M, N]`` for rows ``x2 [M, K]`` (unit stride along K) and contiguous packed tensors (so their row
        strides are their widths)."""
        call, split_k = self.call, self.config.split_k
        zeros_or = scales if zeros is None else zeros
        if self.dequant:
            weight = torch.empty((call.n, call.k), device=x2.device, dtype=x2.dtype)
            common.kernel(int4_dequantize_kernel)[self.grid](
                qweight, scales, zeros_or, weight, call.n, call.k, qweight.stride(0), scales.stride(0),
                weight.stride(0), **self.kwargs,
            )  # fmt: skip
            return torch.nn.functional.linear(x2, weight, None if bias is None else bias.to(x2.dtype))
        out = torch.empty((call.m, call.n), device=x2.device, dtype=x2.dtype)
        work, counts = (common.split_workspace(x2.device, call.m * call.n, self.grid[0]) if split_k > 1
                        else common.no_workspace(out))  # fmt: skip
        pointers = (x2, qweight, scales, zeros_or, scales if bias is None else bias, out, work, counts)
        sizes = (call.m, call.n, call.k, split_k, x2.stride(0), qweight.shape[1], scales.shape[1], call.n)
        try:
            if self.use_dot:
                sums = tile_sums(x2, call.k, self.kwargs["BLOCK_K"]) if self.sums else scales
                common.kernel(int4_linear_kernel)[self.grid](*pointers, sums, *sizes, **self.kwargs)
            else:
                common.kernel(int4_gemv_kernel)[self.grid](*pointers, *sizes, **self.kwargs)
        except Exception as error:
            if not common.fewer_stages(error, self.kwargs, self):
                raise
            return self(x2, qweight, scales, zeros, bias)
        return out


def bind(scheme, x, qweight, scales, zeros, bias, *, path: str | None = None, config=None):
    """``launch(x, qweight, scales, zeros, bias) -> y`` for calls with this one's signature (scheme, M, N, K,
    dtypes, device, bias or not): the dispatch table's ``bind``. Validation happens here, once; the config is
    chosen (tuned, on a GPU) on the first call and its kernel arguments worked out once per config, so a later
    call reshapes the activation, allocates the output and launches. ``config`` fixes the config."""
    scheme = as_scheme(scheme)
    if not (isinstance(scheme, IntWeightOnly) and scheme.bits == 4):
        raise ValueError(f"int4_linear serves int4 weight-only schemes, got {scheme.name}")
    _, m, n, k = common.prepare_rows(x, qweight, scales, zeros, scheme, "int4_linear")
    path = path or common.path_for_m(m)
    call = Call(path, m, n, k, scheme.group_size_for(k), x.dtype, zeros is None, bias is not None)
    device = x.device
    shape_ok = words_shape(qweight.contiguous(), call.group_size)  # the part that depends on shapes alone
    dot_words = shape_ok and code_dtype(x.dtype) is not None
    bound = autotune.BoundLaunches(
        lambda: tune_key(path, m, n, k, call.group_size, device, call.symmetric, dot_words),
        lambda: candidate_configs(path, m, k, call.group_size),
        lambda: default_config(path, m, call.group_size, dot_words),
        lambda cfg, words_ok: Launch(call, cfg, words_ok), device, config,
    )  # fmt: skip

    def run(x, qweight, scales, zeros, bias) -> torch.Tensor:
        x2 = common.as_rows(x)
        qweight, scales = qweight.contiguous(), scales.contiguous()
        zeros = None if zeros is None else zeros.contiguous()
        out = bound(shape_ok and common.word_aligned(qweight), x2, qweight, scales, zeros, bias)
        return common.as_input_shape(out, x)

    run.bound = bound  # its config, for reports
    return run


def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    scheme,
    *,
    path: str | None = None,
    config: autotune.KernelConfig | None = None,
) -> torch.Tensor:
    """``qcompile::linear`` for ``int4-gN`` schemes. ``path`` (``gemv``/``splitk``/``gemm``) defaults by M."""
    return bind(scheme, x, qweight, scales, zeros, bias, path=path, config=config)(x, qweight, scales, zeros, bias)
