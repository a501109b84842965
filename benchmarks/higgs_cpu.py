"""HIGGS on the CPU (``codegen/cpp/kernels/higgs.h``): the cost of the activation's Walsh–Hadamard transform against
the matmul, and both against dense ``F.linear`` in the same run.

    python benchmarks/higgs_cpu.py                           # 4096 x 4096, higgs-4, M = 1 and 128
    python benchmarks/higgs_cpu.py --schemes higgs-4,higgs-3-p1 --tokens 1,16,128

Per scheme and token count, the median of ``--repeats`` runs after two warm-up runs, in microseconds: ``fwht``, the
C++ rotation alone (``prepare_higgs``: zero padding plus ``log2(h)`` butterfly stages per block, float32 out);
``fwht torch``, the same transform as torch ops (``qcompile.schemes.higgs.walsh_hadamard``, float32); ``higgs``, the
whole ``qcompile::linear`` call as the dispatcher serves it (the decode kernel below ``GEMM_MIN_TOKENS`` tokens,
rotation + dequantized slices + torch's GEMM from there on); ``F.linear``, fp32 on the dense weight. Ratios are
against ``F.linear``. The weight is random codes with small float16 scales (the kernels' work does not depend on the
values).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import qcompile  # noqa: F401  (registers torch.ops.qcompile.linear)
from qcompile.codegen.cpp import higgs as cpp_higgs
from qcompile.codegen.cpp import library
from qcompile.runtime import dispatch
from qcompile.schemes import parse_scheme
from qcompile.schemes.higgs import walsh_hadamard
from timing import median_ms


def random_packed(scheme, n: int, k: int, generator) -> list[torch.Tensor]:
    """The scheme's tensors with random code bytes and float16 scales in [0.01, 0.02)."""
    specs = scheme.tensors(n, k)
    qweight = torch.randint(0, 256, specs[0].shape, dtype=torch.uint8, generator=generator)
    scales = (0.01 + 0.01 * torch.rand(specs[1].shape, generator=generator)).to(torch.float16)
    return [qweight, scales]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--schemes", default="higgs-4")
    parser.add_argument("--tokens", default="1,128")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch and kernel threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    n, k = args.n, args.k
    weight = torch.randn(n, k, generator=generator) * 0.02
    print(f"N={n} K={k} threads={torch.get_num_threads()} isa={library.active_isa()}")
    print(f"{'scheme':<14}{'M':>5}{'fwht us':>11}{'fwht torch':>12}{'higgs us':>11}{'F.linear':>11}"
          f"{'fwht/F.lin':>12}{'higgs/F.lin':>13}{'fwht/higgs':>12}  row")  # fmt: skip
    for name in args.schemes.split(","):
        scheme = parse_scheme(name)
        packed = random_packed(scheme, n, k, generator)
        ints = cpp_higgs.params(scheme, k)
        kp = ints[0]
        for m in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(m, k, generator=generator)
            xp = torch.nn.functional.pad(x, (0, kp - k))
            with torch.no_grad():
                row = dispatch.choose_kernel(name, x, packed, None, k, n)
                fwht = 1e3 * median_ms(lambda: cpp_higgs.prepare(x, ints), args.repeats)
                fwht_torch = 1e3 * median_ms(lambda: walsh_hadamard(xp, scheme.hadamard), args.repeats)
                full = 1e3 * median_ms(lambda: torch.ops.qcompile.linear(x, packed, None, name, k, n), args.repeats)
                dense = 1e3 * median_ms(lambda: F.linear(x, weight), args.repeats)
            print(f"{name:<14}{m:>5}{fwht:>11.1f}{fwht_torch:>12.1f}{full:>11.1f}{dense:>11.1f}{fwht / dense:>12.4f}"
                  f"{full / dense:>13.3f}{fwht / full:>12.4f}  {getattr(row, 'name', 'reference')}")  # fmt: skip


if __name__ == "__main__":
    main()
