"""Triton kernels for ``qcompile::linear``, with the dequantization fused into the GEMM prologue.

| module      | job                                                                          |
|-------------|------------------------------------------------------------------------------|
| `int4`      | W4A16 (`int4-gN`, symmetric and asymmetric): configs and launcher             |
| `int4_kernels` | the W4A16 ``@triton.jit`` kernels (GEMV, dot, dequantize)                  |
| `w8a16`     | W8A16 (`int8` per channel) and FP8 weight-only (`fp8`)                         |
| `w8a8`      | W8A8 (`w8a8` int8, `fp8-w8a8`): per-row activation quantization + 8-bit GEMM   |
| `paths`     | the path table (GEMV / split-K / GEMM by M): the families' CUDA kernel rows    |
| `autotune`  | tuned configs: per-key search on a GPU, on-disk cache, JSON export/import;   |
|             | the bound launches of one call signature                                     |
| `candidates`| candidate and default launch configs by path and M bucket                      |
| `tiles`     | ``@triton.jit`` helpers shared by the kernels                                 |
| `traceable` | the rows' launches as a graph tracer records them, for inductor to compile    |
| `common`    | interpreter detection, M buckets, dtypes                                      |
| `rows`      | what the families' CUDA rows share: the call checks, the one-row list         |
| `asm`       | compiles the real launches for a GPU target on any host and reads the code    |

A family with kernels of its own adds its module here and names it in its registry entry (``Family.kernels``),
which gives its CUDA rows with ``kernel_entries(family)``. See ``docs/gpu-kernels.md``.
"""

from __future__ import annotations
