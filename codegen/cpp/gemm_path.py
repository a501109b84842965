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

#: (kind, activation dtype, machine class) -> the smallest token count that takes the GEMM path. Measured with
#: ``benchmarks/cpu_kernels.py --crossover`` (4096 x 4096, 2 threads, M from 1 to 128: the first M from which the GEMM
#: path stays faster). ``amx``: a 2-core Sapphire Rapids guest. ``avx512``: a 2-core AMD EPYC guest with AVX-512
#: (VNNI, BF16) and no AMX, two runs: bfloat16 GEMMs (AVX512-BF16) win early; its float32 GEMM is slow (about 170
#: GFLOP/s on two cores), so float32 weight-only calls cross late (int4 at 64, int8 at 24: 48 splits them) and the
#: W4A8 direct kernel (VNNI) beat the float32 GEMM path at every M up to 128 (11 against 23-35 ms at 128).
CROSSOVER = {
    ("weight-only", torch.bfloat16, "amx"): 16,
    ("weight-only", torch.float32, "amx"): 32,
    ("w8a8", torch.bfloat16, "amx"): 16,
    ("w8a8", torch.float32, "amx"): 16,
    ("w4a8", torch.bfloat16, "amx"): 16,
    ("w4a8", torch.float32, "amx"): 32,
    ("weight-only", torch.bfloat16, "avx512"): 12,
    ("weight-only", torch.float32, "avx512"): 48,
    ("w8a8", torch.bfloat16, "avx512"): 24,
    ("w8a8", torch.float32, "avx512"): 24,
    ("w4a8", torch.bfloat16, "avx512"): 32,
    ("w4a8", torch.float32, "avx512"): 256,
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
