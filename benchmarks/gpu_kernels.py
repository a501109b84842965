"""qcompile Triton kernels vs cuBLAS bf16, tinygemm int4, inductor int8 and ``torch._scaled_mm`` on Llama-8B shapes.

    python benchmarks/gpu_kernels.py              # correctness + the full table (first run tunes: a few minutes)
    python benchmarks/gpu_kernels.py --no-tune    # untuned keys use default configs (QCOMPILE_TRITON_TUNE=0)
    python benchmarks/gpu_kernels.py --m 1 16 --schemes int4-g128

Prints (1) the relative error of every scheme vs the reference op and (2) per (scheme, K×N, M): time of the
qcompile kernel, of cuBLAS bf16 ``F.linear`` and of the scheme's PyTorch peer, the speedups, and the achieved
weight bandwidth against a measured device-to-device copy. Times come from CUDA-graph replays that cycle through
enough weight copies (256 MB) that no weight stays in L2; ``--no-graphs`` times eager calls with
``triton.testing.do_bench`` instead (L2 flushed between runs; Python launch overhead included). A last section
prints eager per-call times at M=1, launch overhead included.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (K, N): attention out/qkv, MLP up/gate, MLP down
M_VALUES = (1, 16, 64, 256, 2048)
SCHEMES = ("int4-g128", "int8", "w8a8", "fp8-w8a8", "fp8")
PEER = {"int4-g128": "tinygemm", "int8": "inductor-int8", "w8a8": "int_mm", "fp8-w8a8": "scaled_mm",
        "fp8": "scaled_mm"}  # fmt: skip


L2_ROTATION_BYTES = 256 << 20  # weights cycled per timed graph: several times any GPU's L2


def bench(calls, graphs: bool) -> float:
    """Milliseconds per call of ``calls`` (callables over distinct weight copies, cycled so no weight stays in L2).

    With ``graphs`` the calls are captured in one CUDA graph and replayed: launch overhead drops out and the time is
    the GPU's. Without, ``triton.testing.do_bench`` times eager calls of the first copy (L2 flushed between runs).
    """
    from qcompile.codegen.triton.autotune import graph_replay_ms
    from triton.testing import do_bench

    for call in calls:
        call()  # tune / compile outside the timed region
    torch.cuda.synchronize()
    if not graphs:
        return do_bench(calls[0], warmup=10, rep=50)
    rounds = max(1, 64 // len(calls))

    def cycle():
        for _ in range(rounds):
            for call in calls:
                call()

    return graph_replay_ms(cycle, samples=5) / (rounds * len(calls))


def copies_for(nbytes: int) -> int:
    """How many weight copies make one pass over them larger than L2 several times over."""
    return max(1, min(64, -(-L2_ROTATION_BYTES // max(1, nbytes))))


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written)."""
    from triton.testing import do_bench

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=5, rep=50)
    return 2 * src.numel() / ms / 1e6


def quantized(scheme_name: str, weight: torch.Tensor):
    from qcompile.schemes import parse_scheme

    scheme = parse_scheme(scheme_name)
    packed = scheme.pack(scheme.quantize(weight.float()))
    return packed.qweight, packed.scales, packed.get("zeros"), packed.nbytes


def qlinear(x, qweight, scales, zeros, scheme_name: str) -> torch.Tensor:
    """``torch.ops.qcompile.linear`` over the (qweight, scales[, zeros]) list of the integer and fp8 families."""
    tensors = [t for t in (qweight, scales, zeros) if t is not None]
    return torch.ops.qcompile.linear(x, tensors, None, scheme_name, x.shape[-1], scales.shape[0])


# -- peers --------------------------------------------------------------------------------------------------------
def tinygemm(weight: torch.Tensor, group_size: int = 128):
    """``aten._weight_int4pack_mm`` with an asymmetric int4 g128 weight (tinygemm: w = (q - 8) * scale + zero)."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scales = ((hi - lo) / 15).clamp_min(1e-6)
    q = torch.clamp(torch.round((groups - lo[..., None]) / scales[..., None]), 0, 15).to(torch.int32).reshape(n, k)
    zeros = lo + 8 * scales
    packed_uint8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(packed_uint8, 8)
    scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
    return lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scales_and_zeros)


@functools.cache
def _compiled_int8_linear():
    torch._dynamo.config.recompile_limit = 64  # dynamic shapes: M=1 is specialized, the rest share a graph
    return torch.compile(lambda x, q, scales: F.linear(x, q.to(x.dtype)) * scales, dynamic=True)


def inductor_int8(weight: torch.Tensor):
    """gpt-fast style int8 weight-only linear compiled by inductor: ``F.linear(x, q.to(x.dtype)) * scales``."""
    scales = weight.float().abs().amax(1).clamp_min(1e-8) / 127
    q = torch.round(weight.float() / scales[:, None]).to(torch.int8)
    scales = scales.to(torch.bfloat16)
    compiled = _compiled_int8_linear()
    return lambda x: compiled(x, q, scales)


def _rowwise_peer(weight: torch.Tensor, quantize, matmul):
    """``x -> matmul(x_q, x_scale, w_q, w_scale [1, N])`` with both operands quantized per row by ``quantize``; the
    activation is quantized once per shape, outside the timed calls."""
    w_q, w_scale = quantize(weight)
    w_scale = w_scale.reshape(1, -1).float().contiguous()
    cache = {}

    def run(x):
        if x.shape not in cache:
            cache[x.shape] = quantize(x)
        return matmul(*cache[x.shape], w_q, w_scale)

    return run


def scaled_mm_rowwise(weight: torch.Tensor):
    """``torch._scaled_mm`` fp8 e4m3 rowwise."""
    from qcompile.schemes.fp8 import quantize_rowwise_fp8

    return _rowwise_peer(weight, quantize_rowwise_fp8, lambda x_q, x_s, w_q, w_s: torch._scaled_mm(
        x_q, w_q.t(), scale_a=x_s, scale_b=w_s, out_dtype=torch.bfloat16))  # fmt: skip


def int_mm_rowwise(weight: torch.Tensor):
    """``torch._int_mm`` (int8 x int8 -> int32) with the per-row scales applied after; cuBLASLt needs M > 16."""
    from qcompile.schemes.w8a8 import quantize_per_token_int8

    return _rowwise_peer(weight, quantize_per_token_int8, lambda x_q, x_s, w_q, w_s: (
        torch._int_mm(x_q, w_q.t()) * (x_s * w_s)).to(torch.bfloat16))  # fmt: skip


PEERS = {"tinygemm": tinygemm, "inductor-int8": inductor_int8, "scaled_mm": scaled_mm_rowwise,
         "int_mm": int_mm_rowwise}  # fmt: skip


# -- the two reports ----------------------------------------------------------------------------------------------
def correctness(schemes, device_name: str) -> None:
    from qcompile.runtime import dispatch
    from qcompile.runtime.ops import reference_linear
    from qcompile.schemes import parse_scheme

    print(f"\n## correctness on {device_name}: max |y - ref| / max |ref|, bf16 activations, K=N=4096")
    weight = torch.randn(4096, 4096, device="cuda") * 0.02
    extra = ["int4-g128-sym"] if "int4-g128" in schemes else []
    for scheme_name in list(schemes) + extra:
        try:
            qweight, scales, zeros, _ = quantized(scheme_name, weight)
            errors = []
            for m in (1, 16, 256):
                x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
                y = qlinear(x, qweight, scales, zeros, scheme_name).float()
                tensors = [t for t in (qweight, scales, zeros) if t is not None]
                ref = reference_linear(x.float(), tensors, None, scheme_name, 4096, 4096)
                errors.append(f"M={m}: {((y - ref).abs().max() / ref.abs().max()).item():.1e}")
            kernel, reason = dispatch.select_kernel(parse_scheme(scheme_name), x, tensors)
            used = kernel.name if kernel is not None else f"reference ({reason})"
            print(f"{scheme_name:>13}  " + "  ".join(errors) + f"  [M=256: {used}]", flush=True)
        except Exception as error:  # noqa: BLE001 - report and go on
            print(f"{scheme_name:>13}  FAILED: {type(error).__name__}: {error}", flush=True)


def timing_table(schemes, m_values, graphs: bool, copy_gbs: float) -> None:
    from qcompile.runtime import dispatch

    print(f"\n## time per call (µs){' from CUDA-graph replays' if graphs else ''}, weights cycled past L2; "
          f"x = other / qcompile; weight GB/s vs copy {copy_gbs:.0f} GB/s")  # fmt: skip
    header = f"{'scheme':>10} {'K x N':>12} {'M':>5} {'qcompile':>9} {'bf16':>9} {'x bf16':>7} {'peer':>14} "
    print(header + f"{'peer us':>9} {'x peer':>7} {'GB/s':>7} {'% copy':>7}  config (tuned or default)", flush=True)
    for k, n in SHAPES:
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        dense_weights = [weight] + [weight.clone() for _ in range(copies_for(weight.numel() * 2) - 1)]
        dense_ms = {}
        for scheme_name in schemes:
            qweight, scales, zeros, nbytes = quantized(scheme_name, weight)
            count = copies_for(nbytes)
            packed = [(qweight, scales, zeros)] + [
                (qweight.clone(), scales.clone(), None if zeros is None else zeros.clone()) for _ in range(count - 1)
            ]
            peer_name = PEER.get(scheme_name)
            peers = _make_peers(peer_name, weight, count)
            for m in m_values:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                try:
                    ours = bench([functools.partial(qlinear, x, q, s, z, scheme_name)
                                  for q, s, z in packed], graphs)  # fmt: skip
                except Exception as error:  # noqa: BLE001 - one failing row must not lose the table
                    print(f"{scheme_name:>10} {f'{k}x{n}':>12} {m:5d} FAILED: {type(error).__name__}: {error}")
                    continue
                if m not in dense_ms:
                    dense_ms[m] = bench([functools.partial(F.linear, x, w) for w in dense_weights], graphs)
                dense = dense_ms[m]
                if isinstance(peers, list):
                    try:
                        peer_ms = bench([functools.partial(peer, x) for peer in peers], graphs)
                        peer_cols = f"{peer_ms * 1e3:9.1f} {peer_ms / ours:7.2f}"
                    except Exception as error:  # noqa: BLE001
                        peer_cols = f"{'n/a':>9} {type(error).__name__[:7]:>7}"
                else:
                    peer_cols = f"{'n/a':>9} {'':>7}"
                gbs = nbytes / ours / 1e6
                tensors = [t for t in packed[0] if t is not None]
                bound = getattr(dispatch.launcher(scheme_name, x, tensors, None, k, n), "bound", None)
                chosen = None if bound is None else bound.config
                print(
                    f"{scheme_name:>10} {f'{k}x{n}':>12} {m:5d} {ours * 1e3:9.1f} {dense * 1e3:9.1f} "
                    f"{dense / ours:7.2f} {peer_name or '-':>14} {peer_cols} {gbs:7.0f} {100 * gbs / copy_gbs:6.0f}%"
                    f"  {chosen.label if chosen is not None else '-'}",
                    flush=True,
                )
            del packed, peers
        del dense_weights
        torch.cuda.empty_cache()


def _make_peers(peer_name, weight, count):
    """``count`` instances of the scheme's PyTorch peer (distinct weight copies), or why there is none."""
    if peer_name is None:
        return "none"
    try:
        return [PEERS[peer_name](weight) for _ in range(count)]
    except Exception as error:  # noqa: BLE001 - a missing peer is reported, not fatal
        return f"n/a ({type(error).__name__}: {error})"


def launch_overhead(schemes) -> None:
    """Eager time per call at M=1 (launch overhead included), qcompile op vs ``F.linear``, K=N=4096."""
    from triton.testing import do_bench

    print("\n## eager calls at M=1, K=N=4096 (µs, launch overhead included; do_bench, L2 flushed)")
    weight = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    dense = do_bench(lambda: F.linear(x, weight), warmup=10, rep=50)
    for scheme_name in schemes:
        qweight, scales, zeros, _ = quantized(scheme_name, weight)
        call = functools.partial(qlinear, x, qweight, scales, zeros, scheme_name)
        call()
        ours = do_bench(call, warmup=10, rep=50)
        print(f"{scheme_name:>10}: qcompile {ours * 1e3:7.1f}   F.linear bf16 {dense * 1e3:7.1f}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES))
    parser.add_argument("--m", nargs="+", type=int, default=list(M_VALUES))
    parser.add_argument("--no-graphs", dest="graphs", action="store_false",
                        help="time eager launches (do_bench) instead of CUDA-graph replays")
    parser.add_argument("--no-tune", action="store_true", help="use each kernel's default config")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu_kernels.py needs a CUDA GPU and none is visible; nothing was measured.", file=sys.stderr)
        return 2
    import qcompile  # noqa: F401  (registers torch.ops.qcompile.linear)
    from qcompile.codegen.triton import autotune
    from qcompile.runtime import dispatch

    if args.no_tune:
        os.environ[autotune.TUNE_ENV] = "0"
    dispatch.load_builtin_kernels()
    torch.manual_seed(0)
    started = time.time()
    name = torch.cuda.get_device_name()
    import triton

    print(f"# {name}, torch {torch.__version__}, triton {triton.__version__}")
    correctness(args.schemes, name)
    timing_table(args.schemes, args.m, args.graphs, copy_bandwidth())
    launch_overhead(args.schemes)
    print(f"\ndone in {time.time() - started:.0f} s; tuned configs cached in {autotune.default_cache_path()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
