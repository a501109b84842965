"""GGUF block kernels on the CPU (``codegen/cpp/kernels/gguf_linear.h``, ``gguf_gemv.h``): both forms of every type
against dense ``F.linear``.

    python benchmarks/gguf_cpu.py                  # 4096 x 4096, M = 1 and 128, every type
    python benchmarks/gguf_cpu.py --types q4_0,q4_k --tokens 1,4,16,32,64

Per type and token count, the median of ``--repeats`` runs after two warm-up runs, in microseconds: ``exact``, the
float form's direct kernel (``linear_gguf``); ``gemm``, its path for many tokens (``dequant_gguf`` slices and
torch's GEMM, float32; ``gemm bf16``: the same with bfloat16 activations, slices and GEMM); ``q8``, llama.cpp's
int8-activation form (``linear_gguf_q8``); and in the same run fp32 and bf16 ``F.linear`` on the dense weight.
"GB/s" is the packed block bytes read per second at M = 1. Each form is timed through its launcher
(``codegen/cpp/gguf.py``), whatever row the dispatcher would pick. The weights are random block bytes with small
finite f16 scales (the kernels' work does not depend on the values).
Prints the instruction set the kernels ran (``QCOMPILE_CPU_ISA`` forces one) and the variants this CPU cannot run.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import qcompile  # noqa: F401  (registers torch.ops.qcompile.linear)
from qcompile.codegen.cpp import gguf, library
from qcompile.schemes import gguf_blocks
from qcompile.schemes.gguf import GGUFScheme
from timing import median_ms

HALF_FIELDS = ("d", "dmin", "m")


def random_blocks(qtype: str, n: int, k: int, generator) -> torch.Tensor:
    """``uint8 [N, nb * BYTES]``: random bytes, every f16 field a value in (-0.05, 0.05)."""
    kind = gguf_blocks.BLOCK_TYPES[qtype]
    nb = -(-k // kind.qk)
    blocks = torch.randint(0, 256, (n * nb, kind.nbytes), dtype=torch.uint8, generator=generator)
    at = 0
    for name, size in kind.layout:
        if name in HALF_FIELDS:
            half = ((torch.rand(n * nb, generator=generator) - 0.5) * 0.1).to(torch.float16)
            blocks[:, at : at + 2] = half.view(torch.uint8).reshape(-1, 2)
        at += size
    return blocks.reshape(n, -1)


def forms(scheme, x, packed, n: int) -> dict:
    """``name -> fn()`` for the forms of this call (the GEMM path only where the exact form would take it)."""
    direct, q8 = gguf.direct_launcher(scheme, x, n), gguf.direct_launcher(scheme, x, n, "linear_gguf_q8")
    out = {"exact": lambda: direct(x, packed, None), "q8": lambda: q8(x, packed, None)}
    if x.shape[0] >= gguf.GEMM_MIN_TOKENS:
        x16 = x.bfloat16()
        out["gemm"] = lambda: gguf.dequantize_gemm(scheme, x, packed, None, n)
        out["gemm bf16"] = lambda: gguf.dequantize_gemm(scheme, x16, packed, None, n)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--tokens", default="1,128")
    parser.add_argument("--types", default=",".join(gguf_blocks.BLOCK_TYPES))
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    n, k, repeats = args.n, args.k, args.repeats
    tokens = [int(t) for t in args.tokens.split(",")]
    types = args.types.split(",")
    missing = [isa for isa in library.ISAS if not library.cpu_supports(isa)]
    print(f"ISA {library.active_isa()}; variants this CPU cannot run: {', '.join(missing) or 'none'}; "
          f"{torch.get_num_threads()} threads; N x K = {n} x {k}; Q8_MAX_TOKENS {gguf.Q8_MAX_TOKENS}, "
          f"GEMM_MIN_TOKENS {gguf.GEMM_MIN_TOKENS}")  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(n, k, generator=generator) * 0.02
    dense16 = dense.bfloat16()
    columns = ("type", "bytes", "M", "fp32 F.linear", "bf16 F.linear", "exact", "gemm", "gemm bf16", "q8",
               "exact GB/s", "q8 GB/s")  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    for m in tokens:
        x = torch.randn(m, k, generator=generator)
        x16 = x.bfloat16()
        fp32 = median_ms(lambda: F.linear(x, dense), repeats) * 1e3
        bf16 = median_ms(lambda: F.linear(x16, dense16), repeats) * 1e3
        for qtype in types:
            scheme = GGUFScheme(qtype)
            packed = [random_blocks(qtype, n, k, generator)]
            nbytes = packed[0].numel()
            times = {name: median_ms(fn, repeats) * 1e3 for name, fn in forms(scheme, x, packed, n).items()}
            rate = {name: f"{nbytes / t / 1e3:.1f}" if m == 1 else "" for name, t in times.items()}
            gemm = " | ".join(f"{times[name]:.0f}" if name in times else "" for name in ("gemm", "gemm bf16"))
            print(f"| {qtype} | {nbytes / 2**20:.1f} MiB | {m} | {fp32:.0f} | {bf16:.0f} | {times['exact']:.0f} | "
                  f"{gemm} | {times['q8']:.0f} | {rate['exact']} | {rate['q8']} |")  # fmt: skip


if __name__ == "__main__":
    main()
