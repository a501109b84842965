"""From how many tokens a call leaves the direct C++ kernel for the GEMM path.

Decode-sized calls run the direct kernels (``kernels/*.h``): one pass over the packed weight, bound by memory.
Calls of many tokens are bound by arithmetic instead, and the machine's fastest GEMM wins there: weight-only
kernels dequantize the weight in slices into the activation's dtype and call torch's GEMM (oneDNN: AMX tiles for
bfloat16 on CPUs that have them, AVX512-BF16 or AVX-512 / AVX2 FMA otherwise); W8A8 quantizes the activations and
calls torch's int8 GEMM (``torch._int_mm``: AMX-INT8 or VNNI through oneDNN).

The crossover depends on what the CPU multiplies fastest, so :data:`CROSSOVER` holds one measured value per kind
of call, activation dtype and machine class (``benchmarks/cpu_kernels.py --crossover`` measures them);
``$QCOMPILE_GEMM_MIN_TOKENS`` overrides every entry (1: always the GEMM path; a huge number: never).
"""

from __future__ import annotations

import functools
import os

import torch

ENV = "QCOMPILE_GEMM_MIN_TOKENS"
KINDS = ("weight-only", "w8a8", "w4a8")
CLASSES = ("amx", "avx512", "avx2")  # best first

#: (kind, activation dtype, machine class) -> the smallest token count that takes the GEMM path. The ``amx`` rows were
#: measured on a 2-core Sapphire Rapids guest (one thread's CPU time, 4096 x 4096, M in 1, 8, 16, 32: the first M
#: where the GEMM path won); the ``avx512`` rows (AVX-512 without AMX) are not measured yet: the ``amx`` values
#: doubled, since FMA GEMMs gain less from many tokens than AMX ones
CROSSOVER = {
    ("weight-only", torch.bfloat16, "amx"): 16,
    ("weight-only", torch.float32, "amx"): 32,
    ("w8a8", torch.bfloat16, "amx"): 16,
    ("w8a8", torch.float32, "amx"): 16,
    ("w4a8", torch.bfloat16, "amx"): 16,
    ("w4a8", torch.float32, "amx"): 32,
    ("weight-only", torch.bfloat16, "avx512"): 32,
    ("weight-only", torch.float32, "avx512"): 64,
    ("w8a8", torch.bfloat16, "avx512"): 32,
    ("w8a8", torch.float32, "avx512"): 32,
    ("w4a8", torch.bfloat16, "avx512"): 32,
    ("w4a8", torch.float32, "avx512"): 64,
}
#: a machine class or dtype the table does not name (AVX2, scalar): the direct kernels were measured faster up to
#: 128 tokens on a 2-core AVX2 machine
DEFAULT = 256


@functools.lru_cache(maxsize=1)
def machine_class() -> str:
    """``"amx"`` (AMX tiles: oneDNN's bfloat16 and int8 GEMMs use them), ``"avx512"``, ``"avx2"`` or ``"scalar"``."""
    cpu = torch.cpu
    if cpu._is_amx_tile_supported():
        return "amx"
    if cpu._is_avx512_supported():
        return "avx512"
    return "avx2" if cpu._is_avx2_supported() else "scalar"


def min_tokens(kind: str, dtype: torch.dtype) -> int:
    """The token count from which ``kind`` calls with ``dtype`` activations take the GEMM path here."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind of call {kind!r}; known: {', '.join(KINDS)}")
    forced = os.environ.get(ENV, "").strip()
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise ValueError(f"${ENV}={forced!r}: expected a token count >= 1")
        return int(forced)
    return CROSSOVER.get((kind, dtype, machine_class()), DEFAULT)
