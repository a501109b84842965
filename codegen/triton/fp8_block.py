"""Triton row and launcher for ``fp8-block`` / ``fp8-block-ue8m0`` (kernels in ``fp8_block_kernels``).

Two launches per call: the activation ``[M, K]`` is quantized per token and group of 128 (e4m3 codes, fp32 scales
``[M, ceil(K/128)]``), then a GEMM walks K one group at a time: ``tl.dot`` of the e4m3 tiles with fp32 accumulation
(sm_89+; under ``TRITON_INTERPRET=1`` the tiles are upcast to fp32 first), each group's sums scaled by the
activation and weight block scales. Tiles: ``BLOCK_N`` 64 (128 from 128 tokens), ``BLOCK_M`` 16, 32, 64 or 128 by M;
when the tiles are fewer than the multiprocessors, K is split over whole groups (the splits meet in an fp32
workspace, ``tiles.store_tile``). No autotuning: the tiles are fixed by M. Ragged K (not a multiple of 128) keeps a
bounds mask along K in every step, and rows of a K that is not a multiple of 16 bytes load byte by byte.

The row serves CUDA tensors on compute capability 8.9 and newer (e4m3 ``tl.dot`` and conversions); older GPUs and
other devices get a reason and the reference path.
"""

from __future__ import annotations

import functools

import torch

from qcompile.codegen.triton import common
from qcompile.codegen.triton.rows import cuda_call_reason, cuda_rows
from qcompile.runtime.dispatch import KernelEntry
from qcompile.schemes.fp8_block import BLOCK, FP8Block, cdiv

PRIORITY = 10
MIN_CAPABILITY = (8, 9)


@functools.cache
def _kernels():
    from qcompile.codegen.triton import fp8_block_kernels

    return fp8_block_kernels


def tiles(m: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` for ``m`` tokens; ``BLOCK_N`` divides 128."""
    block_m = min(128, max(16, common.next_power_of_2(m)))
    block_n = 128 if m >= 128 else 64
    return block_m, block_n, (8 if block_m * block_n >= 128 * 128 else 4), 3


def split_for(tiles_count: int, groups: int, processors: int) -> int:
    """Splits along K (whole groups each) so that about two programs run per multiprocessor, at most 16."""
    if tiles_count >= processors:
        return 1
    return max(1, min(16, groups, cdiv(2 * processors, tiles_count)))


def processor_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (4 under the interpreter, so that small calls split there too)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def quantize_activations(x2: torch.Tensor, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` (unit stride along K) → ``(float8_e4m3fn [M, K], float32 [M, ceil(K/128)])``, as
    ``qcompile.schemes.fp8_block.quantize_activations`` computes them."""
    m, k = x2.shape
    groups = cdiv(k, BLOCK)
    q = torch.empty((m, k), device=x2.device, dtype=torch.float8_e4m3fn)
    s = torch.empty((m, groups), device=x2.device, dtype=torch.float32)
    if m:
        common.kernel(_kernels().quantize_groups_kernel)[(m, groups)](
            x2, q, s, k, groups, x2.stride(0), q.stride(0),
            UE8M0=ue8m0, ROUND_FP8_IN_FP32=common.interpreting(), GROUP_K=BLOCK,
        )  # fmt: skip
    return q, s


def fp8_block_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                     scheme, split_k: int | None = None) -> torch.Tensor:  # fmt: skip
    """``qcompile::linear`` for ``fp8-block``: ``x [..., K]`` fp16/bf16/fp32, ``qweight float8_e4m3fn [N, K]``,
    ``scales float32 [ceil(N/128), ceil(K/128)]``, ``bias [N]`` or ``None`` → ``[..., N]`` in ``x.dtype``.
    ``split_k``: splits along K (default :func:`split_for`)."""
    if not isinstance(scheme, FP8Block):
        raise ValueError(f"fp8_block_linear: {scheme} is not an fp8-block scheme")
    common.check_activation(x, f"fp8_block_linear({scheme.name})")
    x2 = common.as_rows(x)
    m, k, n = x2.shape[0], x2.shape[1], qweight.shape[0]
    # the interpreter's fp32 -> bf16 store truncates: there the kernel writes fp32 and torch rounds it
    out_dtype = torch.float32 if common.interpreting() and x.dtype == torch.bfloat16 else x.dtype
    out = torch.empty((m, n), device=x.device, dtype=out_dtype)
    if m == 0:
        return common.as_input_shape(out.to(x.dtype), x)
    xq, xs = quantize_activations(x2, scheme.ue8m0)
    block_m, block_n, warps, stages = tiles(m)
    groups = xs.shape[1]
    tiles_count = cdiv(m, block_m) * cdiv(n, block_n)
    if split_k is None:
        split_k = split_for(tiles_count, groups, processor_count(x.device))
    split_k = cdiv(groups, cdiv(groups, split_k))  # no empty split
    qweight, scales = qweight.contiguous(), scales.contiguous()
    meta = dict(HAS_BIAS=bias is not None, UPCAST=common.interpreting(), EVEN_K=k % BLOCK == 0, SPLIT=split_k > 1,
                BLOCK_M=block_m, BLOCK_N=block_n, GROUP_K=BLOCK, GROUP_M=8, num_warps=warps,
                num_stages=stages)  # fmt: skip
    work, counts = common.split_workspace(x.device, m * n, tiles_count) if split_k > 1 else common.no_workspace(out)
    kernel = common.kernel(_kernels().fp8_block_gemm_kernel)
    while True:
        try:
            kernel[(tiles_count, split_k)](
                xq, xs, qweight, scales, scales if bias is None else bias, out, work, counts, m, n, k, groups,
                split_k, xq.stride(0), qweight.stride(0), out.stride(0), **meta,
            )  # fmt: skip
            break
        except Exception as error:
            if not common.fewer_stages(error, meta, f"the fp8-block kernel (BLOCK_M={block_m}, BLOCK_N={block_n})"):
                raise
    return common.as_input_shape(out.to(x.dtype), x)


def supports(scheme, x, packed) -> str | None:
    return cuda_call_reason(x, packed, MIN_CAPABILITY, needs="e4m3 dots need compute capability {}+")


def bind(scheme, x, packed, bias, out_features):
    """The dispatch row's ``bind``: the launcher takes the declared tensors ``(qweight, scales)``."""

    def launch(x, packed, bias):
        qweight, scales = packed
        return fp8_block_linear(x, qweight, scales, bias, scheme)

    return launch


def kernel_entries(family: str) -> list[KernelEntry]:
    """The family's CUDA row (none when triton cannot be imported)."""
    return cuda_rows(family, "fp8-block", "triton-fp8-block", supports, bind, PRIORITY)
