"""W4A16: ``int4-gN`` (asymmetric and ``-sym``) weights dequantized in registers right before ``tl.dot``.

Reads the canonical packed layout (``qcompile.schemes.integer`` / ``packing``) directly::

    qweight uint8 [N, K_padded / 2]   element 2j in the low nibble of byte j, element 2j+1 in the high nibble
    scales  float32 [N, G]            G = K_padded / group_size
    zeros   float32 [N, G]            asymmetric: w = (u - zero) * scale;  symmetric (no zeros): w = (u - 8) * scale

The kernels (``int4_kernels.py``) dequantize each tile in registers as ``code * scale - zero * scale`` (codes
become floats by OR-ing exponent bits, no int→float conversion) and feed it to ``tl.dot`` or, for tiny M, to a
broadcast product. Tile forms the tuner chooses among: half tiles (even/odd columns, one byte load), int32 words
(8 nibble planes a tile), and, for large M, dequantize-then-cuBLAS. Columns
``K .. K_padded`` are masked (``K = x.shape[-1]``).

Order of this file: autotune key, config generators, the launcher.
"""

from __future__ import annotations

import dataclasses

import torch

from qcompile.codegen.triton import autotune, candidates, common
from qcompile.codegen.triton.int4_kernels import int4_dequantize_kernel, int4_gemv_kernel, int4_linear_kernel
from qcompile.schemes import IntWeightOnly, as_scheme

KERNEL_NAME = "int4"


# -- autotune key -------------------------------------------------------------------------------------------------
def tune_key(path: str, m: int, n: int, k: int, group_size: int, device: torch.device) -> str:
    return autotune.tune_key(f"{KERNEL_NAME}-{path}", m, n, k, group_size, device)


# -- config generators --------------------------------------------------------------------------------------------
def candidate_configs(path: str, m: int, k: int, group_size: int | None = None) -> list[autotune.KernelConfig]:
    """Two dots of ``BLOCK_K / 2`` per tile: dot paths need ``BLOCK_K >= 32``. Every tile shape is tried with
    bytes and with int32 words (``words``). With ``group_size``, BLOCK_K becomes what the launch would use
    (:func:`gemv_plan`, :func:`tile_plan`), word forms that would not apply are left out, and duplicates dropped."""
    out = []
    for config in candidates.standard_candidates(path, m, k):
        if path != "gemv" and config.block_k < 32:
            continue
        for variant in (config, dataclasses.replace(config, words=1)):
            if group_size is not None:
                if path == "gemv" and not variant.dequant:
                    block_k, _, words = gemv_plan(variant.block_k, bool(variant.words), group_size, True)
                else:
                    use_dot = not variant.dequant
                    block_k, _, words = tile_plan(variant.block_k, bool(variant.words), group_size, use_dot, True)
                if variant.words and not words:
                    continue
                variant = dataclasses.replace(variant, block_k=block_k)
            if variant not in out:
                out.append(variant)
    return out


def gemv_plan(block_k: int, words: bool, group_size: int, words_ok: bool) -> tuple[int, bool, bool]:
    """``(BLOCK_K, group aligned, words)`` of a GEMV launch: tiles lie within one group (BLOCK_K shrinks to divide
    it) so the scale is applied per tile; words need such a tile of whole words."""
    block_k, aligned = aligned_block_k(block_k, group_size, False)
    return block_k, aligned, words and words_ok and aligned and block_k % 8 == 0


def tile_plan(block_k: int, words: bool, group_size: int, use_dot: bool, words_ok: bool) -> tuple[int, bool, bool]:
    """``(BLOCK_K, group aligned, words)`` of a launch. Word tiles may span whole groups (their scales are then
    gathered once per word row), so a GEMV reads 128 bytes of a row per step even with groups of 128; byte tiles
    shrink BLOCK_K to a divisor of the group. A dot per 8-column plane needs ``BLOCK_K >= 128``."""

    def words_fit(bk: int) -> bool:
        return words and words_ok and bk % 8 == 0 and (not use_dot or bk >= 128)

    if words_fit(block_k) and block_k > group_size and block_k % group_size == 0:
        return block_k, False, True
    block_k, aligned = aligned_block_k(block_k, group_size, use_dot)
    return block_k, aligned, words_fit(block_k)


def default_config(path: str, m: int) -> autotune.KernelConfig:
    return candidates.standard_default(path, m)


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
        words_ok = bool(cfg.words) and words_supported(qweight, group_size)
        if cfg.dequant:
            weight = torch.empty((n, k), device=x.device, dtype=x.dtype)
            block_k, aligned, words = tile_plan(cfg.block_k, bool(cfg.words), group_size, False, words_ok)
            int4_dequantize_kernel[(common.cdiv(n, cfg.block_n), common.cdiv(k, block_k))](
                qweight, scales, scales if zeros is None else zeros, weight, n, k,
                qweight.stride(0), scales.stride(0), weight.stride(0),
                GROUP_SIZE=group_size, SYMMETRIC=zeros is None, GROUP_ALIGNED=aligned, WORDS=words,
                BLOCK_N=cfg.block_n, BLOCK_K=block_k, num_warps=cfg.num_warps,
            )  # fmt: skip
            return torch.nn.functional.linear(x2, weight, None if bias is None else bias.to(x.dtype))
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
        grid = (common.cdiv(m, cfg.block_m) * common.cdiv(n, cfg.block_n), cfg.split_k)
        work, counts = common.split_workspace(x.device, m * n, grid[0]) if cfg.split_k > 1 else (out, out)
        if not use_dot:
            block_k, aligned, words = gemv_plan(cfg.block_k, bool(cfg.words), group_size, words_ok)
            int4_gemv_kernel[grid](
                x2, qweight, scales, scales if zeros is None else zeros, scales if bias is None else bias,
                out, work, counts,
                m, n, k, cfg.split_k, x2.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
                GROUP_SIZE=group_size, SYMMETRIC=zeros is None, HAS_BIAS=bias is not None, GROUP_ALIGNED=aligned,
                SPLIT=cfg.split_k > 1, EVEN_K=k % block_k == 0, WORDS=words,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip
            return out
        block_k, aligned, words = tile_plan(cfg.block_k, bool(cfg.words), group_size, True, words_ok)
        int4_linear_kernel[grid](
            x2, qweight, scales, scales if zeros is None else zeros, scales if bias is None else bias,
            out, work, counts,
            m, n, k, cfg.split_k, x2.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
            GROUP_SIZE=group_size, SYMMETRIC=zeros is None, HAS_BIAS=bias is not None, GROUP_ALIGNED=aligned,
            DOT_DTYPE=common.dot_dtype(x.dtype), DOT_PRECISION=common.dot_precision(x.dtype),
            SPLIT=cfg.split_k > 1, WORDS=words, BLOCK_W=max(1, block_k // 8), EVEN_K=k % block_k == 0,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
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
