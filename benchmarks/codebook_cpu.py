"""Codebook and outlier formats on the CPU at decode sizes: AQLM, VPTQ and SpQR kernels against ``F.linear``.

    python benchmarks/codebook_cpu.py                 # K = N = 4096, M in 1 and 4, every scheme below
    python benchmarks/codebook_cpu.py --quick         # M = 1 only: aqlm-2x8, vptq-v8-k256, vptq-v4-k64-r16-o8, spqr-3
    python benchmarks/codebook_cpu.py --threads 1     # torch.set_num_threads(1) first (default: torch's count)

Columns, per scheme and token count M (times in ms, wall clock, median of ``--repeats`` runs after two warm-up runs,
all in this process at the printed thread count):

- ``fp32 F.linear`` / ``bf16 F.linear``: the dense ``[N, K]`` weight in that dtype (bf16: oneDNN, AMX on CPUs with
  it);
- ``ours f32`` / ``ours bf16``: ``torch.ops.qcompile.linear`` with float32 / bfloat16 activations (the kernel row
  the dispatcher picks; "row" names it);
- ``fp32/ours f32``, ``fp32/ours bf16``: fp32 ``F.linear`` time / ours (> 1: ours is faster than streaming the
  float32 weight); ``bf16/ours bf16``: the same against bf16 ``F.linear``.

The packed weights are **synthetic**: uniformly random codes / indices over each format's whole range, random
float16 codebooks, scales and statistics of realistic size (the real quantizers run k-means on 16M weights, minutes;
the kernels' work does not depend on the values). AQLM and SpQR are built as the scheme's unpacked form and written
with its own ``pack``; VPTQ's index words are random int32 (every field of the bitstream is a valid index), checked
against the declared tensors with ``checked_pack``. SpQR: random 3-bit codes and first-order codes, second-order
statistics of a unit-variance weight, a random input permutation and 1% of the weights as CSR outliers (SpQR's
typical rate). The dense baselines use a random weight of the same shape.

Our kernels are compute bound and ``F.linear`` at one token is memory bound, so on a machine whose cores are shared
(virtual CPUs, a busy sibling hyperthread) the ratios move with the load: compare runs made back to back.
"""

from __future__ import annotations

import argparse
import pathlib
import warnings

import torch
import torch.nn.functional as F

import qcompile  # noqa: F401  (registers torch.ops.qcompile.linear)
from qcompile.codegen.cpp import library
from qcompile.runtime import dispatch
from qcompile.schemes import parse_scheme
from qcompile.schemes.aqlm import AqlmWeight
from qcompile.schemes.base import PackedWeight
from qcompile.schemes.spqr import SpqrWeight
from timing import median_ms

K = N = 4096
SCHEMES = ["aqlm-2x8", "aqlm-1x8-g4", "vptq-v8-k256", "vptq-v4-k64-r16-o8", "vptq-v8-k4096", "vptq-v8-k256-r256",
           "vptq-v16-k4096", "spqr-3"]  # fmt: skip
QUICK = ["aqlm-2x8", "vptq-v8-k256", "vptq-v4-k64-r16-o8", "spqr-3"]
OUTLIER_RATE = 0.01


def synthetic_aqlm(scheme, n: int, k: int, g: torch.Generator):
    groups = scheme.padded_in_features(k) // scheme.group_size
    codes = torch.randint(0, scheme.entries, (n, groups, scheme.num_codebooks), generator=g)
    books = torch.randn(scheme.num_codebooks, scheme.entries, 1, scheme.group_size, generator=g).half()
    scales = (torch.rand(n, 1, 1, 1, generator=g) * 0.02 + 0.01).half()
    return scheme.pack(AqlmWeight(codes, books, scales, k))


def synthetic_vptq(scheme, n: int, k: int, g: torch.Generator):
    """Random index words (every ``tb``-bit field of a word is a valid entry), codebooks and column statistics, in the
    scheme's declared tensor order (packing 16M entries bit by bit would take gigabytes)."""
    r, o, v = scheme.vector_rows(n), scheme.outliers, scheme.vector_len

    def book(size):
        return (torch.randn(size, v, generator=g) * 0.5).half()

    tensors = {"indices": torch.randint(-(2**31), 2**31 - 1, (r, scheme.index_words(k)), generator=g,
                                        dtype=torch.int32),
               "centroids": book(scheme.centroids)}  # fmt: skip
    if scheme.res_centroids:
        tensors["res_centroids"] = book(scheme.res_centroids)
    if o:
        codes = torch.randint(0, scheme.centroids, (r, o), generator=g)
        tensors["outlier_indices"] = torch.where(codes >= 2**15, codes - 2**16, codes).to(torch.int16)
        tensors["outlier_centroids"] = book(scheme.centroids)
    tensors["weight_scale"] = (torch.rand(k, generator=g) * 0.02 + 0.01).half()
    tensors["weight_bias"] = (torch.randn(k, generator=g) * 1e-3).half()
    perm = torch.randperm(k, generator=g)
    tensors["perm"] = torch.where(perm >= 2**15, perm - 2**16, perm).to(torch.int16)
    return scheme.checked_pack(PackedWeight(tensors), n, k)


def synthetic_spqr(scheme, n: int, k: int, g: torch.Generator):
    np_, kp = -(-n // 16) * 16, scheme.padded_in_features(k)
    t, gk = np_ // 16, kp // 16
    codes = torch.randint(0, 8, (np_, kp), generator=g, dtype=torch.uint8)
    scale_codes = torch.randint(0, 8, (np_, gk), generator=g, dtype=torch.uint8)
    zero_codes = torch.randint(0, 8, (np_, gk), generator=g, dtype=torch.uint8)
    # first-order scale ~ range / 7 of 16 unit normals (about 0.5), zero about 3.5: second order over 8 levels
    second = torch.stack([torch.rand(t, gk, generator=g) * 0.05 + 0.05, torch.rand(t, gk, generator=g) * 0.3 + 0.2,
                          torch.rand(t, gk, generator=g) * 2 - 9, torch.rand(t, gk, generator=g) * 2 - 9],
                         -1).half()  # fmt: skip
    mask = torch.rand(n, kp, generator=g) < OUTLIER_RATE
    mask[:, k:] = False
    counts = mask.sum(1)
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    columns = mask.nonzero()[:, 1]
    values = torch.randn(columns.numel(), generator=g).half()
    perm = torch.cat([torch.randperm(k, generator=g), torch.arange(k, kp)])
    return scheme.pack(SpqrWeight(codes, scale_codes, zero_codes, second, offsets, columns, values, perm, k, n))


BUILDERS = {"aqlm": synthetic_aqlm, "vptq": synthetic_vptq, "spqr": synthetic_spqr}


def bench(name: str, tokens: list[int], repeats: int) -> list[dict]:
    scheme = parse_scheme(name)
    g = torch.Generator().manual_seed(0)
    packed = BUILDERS[scheme.family](scheme, N, K, g).list()
    w32 = torch.randn(N, K, generator=g) * 0.02
    wbf = w32.bfloat16()
    rows = []
    for m in tokens:
        x32 = torch.randn(m, K, generator=g)
        xbf = x32.bfloat16()
        t = {"scheme": name, "M": m}
        t["dense f32"] = median_ms(lambda: F.linear(x32, w32), repeats)
        t["dense bf16"] = median_ms(lambda: F.linear(xbf, wbf), repeats)
        names = []
        for label, x in (("f32", x32), ("bf16", xbf)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t[f"ours {label}"] = median_ms(lambda: torch.ops.qcompile.linear(x, packed, None, name, K, N), repeats)
            kernel, _ = dispatch.select_kernel(scheme, x, packed)
            names.append(kernel.name if kernel is not None else "reference")
        t["row"] = " / ".join(dict.fromkeys(names))
        rows.append(t)
        d32, dbf, o32, obf = t["dense f32"], t["dense bf16"], t["ours f32"], t["ours bf16"]
        print(f"| {name} | {m} | {d32:.3f} | {dbf:.3f} | {o32:.3f} | {obf:.3f} | {d32 / o32:.2f} | {d32 / obf:.2f} | "
              f"{dbf / obf:.2f} | {t['row']} |", flush=True)  # fmt: skip
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"M = 1 and {', '.join(QUICK)} only")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's count)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per cell (median reported)")
    parser.add_argument("--schemes", nargs="+", default=None, help=f"scheme names (default: {' '.join(SCHEMES)})")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 9)
    names = args.schemes or (QUICK if args.quick else SCHEMES)
    tokens = [1] if args.quick else [1, 4]
    library.load()
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    fp16 = library.active_isa() == "avx512" and cpuinfo.exists() and "avx512_fp16" in cpuinfo.read_text()
    print(f"# codebook formats on the CPU — torch {torch.__version__}, {torch.get_num_threads()} threads, active "
          f"ISA {library.active_isa()} (SpQR tables with AVX512-FP16: {'yes' if fp16 else 'no'}), K = N = {K}, "
          f"synthetic packed weights; times in ms")  # fmt: skip
    header = ["scheme", "M", "fp32 F.linear", "bf16 F.linear", "ours f32", "ours bf16", "fp32/ours f32",
              "fp32/ours bf16", "bf16/ours bf16", "row"]  # fmt: skip
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
    for name in names:
        bench(name, tokens, repeats)


if __name__ == "__main__":
    main()
