"""The int4 kernel forms side by side at fixed configs, no tuning: do the compiled-code counts hold on a GPU?

    python benchmarks/gpu_forms.py                     # K=4096, N=14336; M in 1, 4, 16, 64, 256 (about a minute)
    python benchmarks/gpu_forms.py --k 4096 --n 4096
    python benchmarks/gpu_forms.py --tiny              # a small shape, correctness only (also on CPU, interpreted)

For each M, every form that serves it runs with one fixed config: the GEMV with bytes and with int32 words (M ≤ 4),
the dot kernel's byte form (dequantized tiles), word form (exact codes, scale after the dot) and, up to 16 rows,
its plane form (one dot per nibble-pair plane), for asymmetric
(``int4-g128``) and symmetric (``int4-g128-sym``) weights. Each row prints the relative error against the
reference op, the time (CUDA-graph replay over enough weight copies that none stays in L2, as in
``gpu_kernels.py``), the speedup over cuBLAS bf16 ``F.linear`` and the packed weight bandwidth. The SASS counts
these forms were chosen by are in ``docs/gpu-kernels.md`` (``python -m qcompile.codegen.triton.asm``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

M_VALUES = (1, 4, 16, 64, 256)


def forms(m: int):
    """``(label, path, config)`` of the forms that serve ``m`` rows."""
    from qcompile.codegen.triton.autotune import KernelConfig as C

    if m <= 4:
        rows = 1 << (m - 1).bit_length()  # the GEMV's row tile, a power of two
        yield "GEMV bytes", "gemv", C(rows, 64, 128, split_k=4, num_stages=2)
        yield "GEMV words", "gemv", C(rows, 128, 128, split_k=8, num_stages=2, words=1)
        yield "dot bytes (16 rows)", "gemv", C(16, 64, 64, split_k=4, num_stages=4)
        yield "dot words (16 rows)", "gemv", C(16, 128, 128, split_k=4, num_stages=3, words=1)
        yield "dot planes (16 rows)", "gemv", C(16, 128, 128, split_k=4, num_stages=3, words=2)
    elif m <= 16:
        yield "split-K dot bytes", "splitk", C(16, 64, 64, split_k=4, num_stages=4)
        yield "split-K dot words", "splitk", C(16, 128, 128, split_k=4, num_stages=3, words=1)
        yield "split-K dot planes", "splitk", C(16, 128, 128, split_k=4, num_stages=3, words=2)
    else:
        block_m = min(128, 1 << (m - 1).bit_length())
        warps = 8 if block_m >= 128 else 4
        yield "GEMM dot bytes", "gemm", C(block_m, 128, 64, num_warps=warps, num_stages=3)
        yield "GEMM dot words", "gemm", C(block_m, 128, 128, num_warps=warps, num_stages=3, words=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--n", type=int, default=14336)
    parser.add_argument("--m", nargs="+", type=int, default=list(M_VALUES))
    parser.add_argument("--tiny", action="store_true", help="K=256, N=128, M in 1, 4, 16, 33: correctness only")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from qcompile.codegen.triton import int4
    from qcompile.runtime.ops import reference_linear
    from qcompile.schemes import parse_scheme

    k, n, ms = (256, 128, [1, 4, 16, 33]) if args.tiny else (args.k, args.n, args.m)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float16  # fp16: the interpreter's dots are exact there
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
    dense = weight.to(device, dtype)
    print(f"# int4 kernel forms, K={k}, N={n}, {dtype}, {torch.cuda.get_device_name() if cuda else 'interpreter'}")
    print("| scheme | M | form | config | rel. error | µs | x bf16 | weight GB/s |\n|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for name in ("int4-g128", "int4-g128-sym"):
        scheme = parse_scheme(name)
        packed = scheme.pack(scheme.quantize(weight))
        tensors = [None if t is None else t.to(device) for t in (packed.qweight, packed.scales, packed.get("zeros"))]
        copies = [tensors]
        if cuda:
            from gpu_kernels import bench, copies_for

            copies += [
                [None if t is None else t.clone() for t in tensors] for _ in range(copies_for(packed.nbytes) - 1)
            ]
        for m in ms:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(device, dtype)
            ref = reference_linear(x.float(), [t for t in tensors if t is not None], None, name, k, n)
            dense_us = bench([lambda: torch.nn.functional.linear(x, dense)], True) * 1e3 if cuda else None
            for label, path, config in forms(m):
                y = int4.int4_linear(x, *tensors, None, scheme, path=path, config=config)
                error = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                worst = worse(worst, error)
                row = f"| {name} | {m} | {label} | {config.label} | {error:.1e} |"
                if cuda:
                    calls = [lambda q=q, s=s, z=z: int4.int4_linear(x, q, s, z, None, scheme, path=path, config=config)
                             for q, s, z in copies]  # fmt: skip
                    us = bench(calls, True) * 1e3
                    row += f" {us:.1f} | {dense_us / us:.2f} | {packed.nbytes / us / 1e3:.0f} |"
                else:
                    row += " – | – | – |"
                print(row, flush=True)
    print(f"# largest relative error {worst:.1e}")
    return 0 if worst < 2e-2 else 1


def worse(worst: float, error: float) -> float:
    """The larger error, a NaN (a form that returned NaN or infinity) counting as infinitely large."""
    return math.inf if math.isnan(error) else max(worst, error)


if __name__ == "__main__":
    raise SystemExit(main())
