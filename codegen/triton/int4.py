"""W4A16: ``int4-gN`` (asymmetric and ``-sym``) weights dequantized in registers right before ``tl.dot``.

Reads the canonical packed layout (``qcompile.schemes.integer`` / ``packing``) directly::

    qweight uint8 [N, K_padded / 2]   element 2j in the low nibble of byte j, element 2j+1 in the high nibble
    scales  float32 [N, G]            G = K_padded / group_size
    zeros   float32 [N, G]            asymmetric: w = (u - zero) * scale;  symmetric (no zeros): w = (u - 8) * scale

The kernels (``int4_kernels.py``): for one to four rows a GEMV without ``tl.dot`` that applies each group's scale
once per tile (bytes, or int32 words at two instructions a nibble); from five rows a dot kernel that dequantizes
the weight tile in registers (``code * scale - zero * scale``; codes become floats by OR-ing exponent bits, no
int→float conversion) and feeds it to ``tl.dot`` as the first operand of the transposed product; for large M
also dequantize-then-cuBLAS. Columns ``K .. K_padded`` are masked (``K = x.shape[-1]``).

Order of this file: autotune key, config generators, the launcher.
"""

from __future__ import annotations

import dataclasses

import torch

from qcompile.codegen.triton import autotune, candidates, common
from qcompile.codegen.triton.int4_kernels import int4_dequantize_kernel, int4_gemv_kernel, int4_linear_kernel
from qcompile.schemes import IntWeightOnly, as_scheme

#: the tuning key's kernel name, with the kernels' revision: configs tuned for earlier kernels are not reused
KERNEL_NAME = "int4v2"


# -- autotune key -------------------------------------------------------------------------------------------------
def tune_key(path: str, m: int, n: int, k: int, group_size: int, device: torch.device) -> str:
    return autotune.tune_key(f"{KERNEL_NAME}-{path}", m, n, k, group_size, device)


# -- config generators --------------------------------------------------------------------------------------------
def candidate_configs(path: str, m: int, k: int, group_size: int | None = None) -> list[autotune.KernelConfig]:
    """The standard candidates (dot paths need ``BLOCK_K >= 32``); GEMV and dequantize tiles also with int32 words
    (``words``). With ``group_size``, BLOCK_K becomes what the launch would use (:func:`plan`), word forms that
    would not apply are left out, and duplicates dropped."""
    out = []
    for config in candidates.standard_candidates(path, m, k):
        dot = path != "gemv" and not config.dequant
        if dot and config.block_k < 32:
            continue
        for variant in (config,) if dot else (config, dataclasses.replace(config, words=1)):
            if group_size is not None:
                block_k, _, words = plan(path, variant, group_size, True)
                if variant.words and not words:
                    continue
                variant = dataclasses.replace(variant, block_k=block_k)
            if variant not in out:
                out.append(variant)
    return out


def plan(path: str, config: autotune.KernelConfig, group_size: int, words_ok: bool) -> tuple[int, bool, bool]:
    """``(BLOCK_K, group aligned, words)`` of a launch with ``config``; ``words_ok``: the rows can be read as words.

    GEMV and dot tiles lie within one group where they can (BLOCK_K shrinks to divide it), so a tile reads one
    scale per row; GEMV words need such a tile of whole words, dot tiles take bytes. Dequantize word tiles may span
    whole groups (scales gathered once per word)."""
    words = bool(config.words) and words_ok
    if config.dequant:
        if words and config.block_k % 8 == 0 and config.block_k > group_size and config.block_k % group_size == 0:
            return config.block_k, False, True
        block_k, aligned = aligned_block_k(config.block_k, group_size, False)
        return block_k, aligned, words and block_k % 8 == 0
    block_k, aligned = aligned_block_k(config.block_k, group_size, path != "gemv")
    return block_k, aligned, path == "gemv" and words and aligned and block_k % 8 == 0


def default_config(path: str, m: int) -> autotune.KernelConfig:
    """The standard default; on a GPU the GEMV reads words (two instructions a nibble, sm_90 SASS) in tiles of
    128 rows, split 8 ways so that even N = 4096 gives 256 programs."""
    config = candidates.standard_default(path, m)
    if path == "gemv" and not common.interpreting():
        config = dataclasses.replace(config, block_n=128, split_k=8, words=1)
    return config


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
def words_supported(qweight: torch.Tensor, group_size: int) -> bool:
    """Whether the packed rows can be read as int32 words: 8 nibbles per word, groups of whole words, aligned."""
    return (qweight.shape[1] % 4 == 0 and qweight.stride(0) % 4 == 0 and qweight.data_ptr() % 4 == 0
            and group_size % 8 == 0)  # fmt: skip


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
    scheme = as_scheme(scheme)
    if not (isinstance(scheme, IntWeightOnly) and scheme.bits == 4):
        raise ValueError(f"int4_linear serves int4 weight-only schemes, got {scheme.name}")
    x2, m, n, k = common.prepare_rows(x, qweight, scales, zeros, scheme, "int4_linear")
    group_size = scheme.group_size_for(k)
    path = path or common.path_for_m(m)
    use_dot = path != "gemv"
    scales, qweight = scales.contiguous(), qweight.contiguous()
    zeros = zeros.contiguous() if zeros is not None else None

    def launch(cfg: autotune.KernelConfig) -> torch.Tensor:
        words_ok = words_supported(qweight, group_size)
        if cfg.dequant:
            weight = torch.empty((n, k), device=x.device, dtype=x.dtype)
            block_k, aligned, words = plan(path, cfg, group_size, words_ok)
            int4_dequantize_kernel[(common.cdiv(n, cfg.block_n), common.cdiv(k, block_k))](
                qweight, scales, scales if zeros is None else zeros, weight, n, k,
                qweight.stride(0), scales.stride(0), weight.stride(0),
                GROUP_SIZE=group_size, SYMMETRIC=zeros is None, GROUP_ALIGNED=aligned, WORDS=words,
                EVEN_K=k % block_k == 0, BLOCK_N=cfg.block_n, BLOCK_K=block_k, num_warps=cfg.num_warps,
            )  # fmt: skip
            return torch.nn.functional.linear(x2, weight, None if bias is None else bias.to(x.dtype))
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
        grid = (common.cdiv(m, cfg.block_m) * common.cdiv(n, cfg.block_n), cfg.split_k)
        work, counts = common.split_workspace(x.device, m * n, grid[0]) if cfg.split_k > 1 else (out, out)
        block_k, aligned, words = plan(path, cfg, group_size, words_ok)
        args = (
            x2, qweight, scales, scales if zeros is None else zeros, scales if bias is None else bias,
            out, work, counts, m, n, k, cfg.split_k, x2.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
        )  # fmt: skip
        shared = dict(
            GROUP_SIZE=group_size, SYMMETRIC=zeros is None, HAS_BIAS=bias is not None, GROUP_ALIGNED=aligned,
            SPLIT=cfg.split_k > 1, EVEN_K=k % block_k == 0, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_K=block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        if use_dot:
            int4_linear_kernel[grid](
                *args, DOT_DTYPE=common.dot_dtype(x.dtype), DOT_PRECISION=common.dot_precision(x.dtype),
                GROUP_M=cfg.group_m, **shared,
            )  # fmt: skip
        else:
            int4_gemv_kernel[grid](*args, EVEN_M=m % cfg.block_m == 0, WORDS=words, **shared)
        return out

    if config is None:
        config = autotune.memoized_choice(
            (KERNEL_NAME, path, common.m_bucket(m), n, k, group_size, x.device),
            lambda: autotune.choose_config(
                tune_key(path, m, n, k, group_size, x.device), lambda: candidate_configs(path, m, k, group_size),
                default_config(path, m), launch, x.device,
            ),
        )  # fmt: skip
    return launch(config).reshape(*x.shape[:-1], n)
