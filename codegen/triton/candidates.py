"""Candidate and default launch configs shared by the Triton kernel families, by path and M bucket.

``autotune.choose_config`` times the candidates on a GPU; the defaults serve untuned keys (the interpreter,
``QCOMPILE_TRITON_TUNE=0``, CUDA-graph capture). Each family filters or extends these lists for its own kernels.
"""

from __future__ import annotations

from qcompile.codegen.triton.autotune import KernelConfig
from qcompile.codegen.triton.common import GEMV_MAX_M, interpreting, m_bucket


def _fits_sum(block_m: int, block_n: int, block_k: int) -> bool:
    """The GEMV path broadcasts ``[BLOCK_M, BLOCK_K, BLOCK_N]`` products; keep that within registers."""
    return block_m * block_n * block_k <= 16384


def standard_candidates(path: str, m: int, k: int, dequant: bool = True) -> list[KernelConfig]:
    """Candidate configs for a real GPU, by path (``gemv``, ``splitk``, ``gemm``) and M bucket.

    Block sizes, warps and stages are compile-time constants (each distinct one is a compile on first tuning);
    ``split_k`` is a run-time argument, so trying several splits per tile shape is cheap. With ``dequant``, GEMMs
    of 128 rows or more also try dequantizing the weight and calling cuBLAS.
    """
    bucket = m_bucket(m)
    if path == "gemv":
        block_m = min(bucket, GEMV_MAX_M)  # wider row tiles would be turned into tf32 dots by triton
        out = [
            KernelConfig(block_m, bn, bk, split_k=sk, num_warps=8 if bn * bk >= 16384 else 4, num_stages=ns)
            for bn in (32, 64, 128, 256)
            for bk in (128, 256)
            for ns in (2, 4)
            for sk in (1, 2, 4, 8, 16)
            if _fits_sum(block_m, bn, bk // 2) and k >= bk * sk
        ]
        return out or [KernelConfig(block_m, 32, 64, split_k=1, num_warps=4, num_stages=2)]
    if path == "splitk":
        return [
            KernelConfig(16, bn, bk, split_k=sk, num_warps=4, num_stages=4)
            for bn in (32, 64, 128)
            for bk in (64, 128)
            for sk in (1, 2, 4, 8)
            if k >= bk * sk
        ] or [KernelConfig(16, 64, 64, split_k=1, num_warps=4, num_stages=4)]
    if path != "gemm":
        raise ValueError(f"unknown kernel path {path!r}; expected 'gemv', 'splitk' or 'gemm'")
    if bucket <= 64:
        block_m = max(16, bucket)
        return [
            KernelConfig(block_m, 64, 128, num_warps=4, num_stages=4),
            KernelConfig(block_m, 128, 64, num_warps=4, num_stages=4),
            KernelConfig(block_m, 128, 128, num_warps=4, num_stages=3),
            KernelConfig(block_m, 256, 64, num_warps=8, num_stages=3),
            KernelConfig(block_m, 64, 128, split_k=2, num_warps=4, num_stages=4),
            KernelConfig(block_m, 128, 64, split_k=2, num_warps=4, num_stages=4),
        ]
    tiles = [
        KernelConfig(256, 64, 64, num_warps=8, num_stages=3),
        KernelConfig(256, 128, 64, num_warps=8, num_stages=3),
        KernelConfig(64, 128, 64, num_warps=4, num_stages=4),
        KernelConfig(64, 256, 64, num_warps=8, num_stages=3),
        KernelConfig(128, 64, 64, num_warps=4, num_stages=4),
        KernelConfig(128, 128, 64, num_warps=8, num_stages=3),
        KernelConfig(128, 128, 128, num_warps=8, num_stages=3),
        KernelConfig(128, 256, 64, num_warps=8, num_stages=3),
    ]
    return tiles + ([DEQUANT_CONFIG] if dequant else [])


#: the dequantize-then-cuBLAS candidate: 32 x 128 dequantize tiles
DEQUANT_CONFIG = KernelConfig(32, 32, 128, num_warps=4, num_stages=1, dequant=1)
#: from this M bucket on, an untuned GEMM dequantizes and calls cuBLAS
DEQUANT_DEFAULT_BUCKET = 1024


def standard_default(path: str, m: int, dequant: bool = True) -> KernelConfig:
    """The config used without tuning: small tiles under the interpreter (split-K exercised), sane ones on a GPU."""
    bucket = m_bucket(m)
    small = interpreting()
    if path == "gemv":
        block_n, block_k, split_k = (32, 64, 2) if small else (64, 128, 4)
        return KernelConfig(min(bucket, GEMV_MAX_M), block_n, block_k, split_k=split_k, num_stages=2)
    if path == "splitk":
        return KernelConfig(16, 32 if small else 64, 32 if small else 64, split_k=2 if small else 4, num_stages=4)
    if path != "gemm":
        raise ValueError(f"unknown kernel path {path!r}; expected 'gemv', 'splitk' or 'gemm'")
    if small:
        return KernelConfig(16, 32, 32, num_stages=1)
    if dequant and bucket >= DEQUANT_DEFAULT_BUCKET:
        return DEQUANT_CONFIG
    return KernelConfig(min(128, max(16, bucket)), 128, 64, num_warps=8 if bucket >= 128 else 4, num_stages=3)
