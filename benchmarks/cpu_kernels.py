"""CPU kernel benchmark: qcompile's C++ kernels and GEMM paths against PyTorch's and onnxruntime's, same weights.

    python benchmarks/cpu_kernels.py            # K x N in 4096x4096, 4096x11008, 11008x4096; M in 1, 8, 32, 128
    python benchmarks/cpu_kernels.py --quick    # 4096x4096, M in 1 and 32
    python benchmarks/cpu_kernels.py --crossover  # per kind and dtype: direct kernel against GEMM path, M = 1..128

Every timing is the median of ``--repeats`` runs after two warm-up runs, in milliseconds, wall clock, at torch's
thread count. Baselines, all in the same run:

- fp32 and bf16 ``F.linear`` on the dense weight (bf16: oneDNN, AMX tiles on CPUs that have them);
- ``aten._weight_int8pack_mm`` and ``aten._weight_int4pack_mm_for_cpu`` (bf16 activations, the same codes);
- onnxruntime ``com.microsoft::MatMulNBits`` on its fast path: the codes and scales of ``int4-g128-sym`` with uint8
  zero points (8, packed two per byte), at ``accuracy_level`` 1 (fp32 compute) and 4 (activations quantized to
  int8), the session option ``session.qdq_matmulnbits_accuracy_level`` set to the same level.

Ours go through ``torch.ops.qcompile.linear``, so each M takes the path a user gets: the direct kernel below the
crossover of ``codegen/cpp/gemm_path.py``, the GEMM path from it on (the "path" column). "BW" is packed weight bytes
read per second at M=1, against the machine's read bandwidth measured with a read-only kernel (``read_bytes``) at
the same thread count.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import qcompile  # noqa: F401  (registers torch.ops.qcompile.linear)
from qcompile.codegen.cpp import gemm_path, launch, library
from timing import median_ms
from qcompile.schemes import parse_scheme

FULL_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
FULL_TOKENS = [1, 8, 32, 128]
GROUP = 128
OURS = ("int4-g128", "int4-g128-sym", "int8", "w8a8", "w4a8-g128")
KIND = {"int4-g128": "weight-only", "int4-g128-sym": "weight-only", "int8": "weight-only", "w8a8": "w8a8",
        "w4a8-g128": "w4a8"}  # fmt: skip


def read_bandwidth_gbs(repeats: int) -> float:
    """Bytes per second a read-only kernel streams from a 256 MiB buffer (no writes)."""
    buffer = torch.ones(256 << 20, dtype=torch.uint8)
    out = torch.empty(8, dtype=torch.int64)
    call = launch.template("read_bytes", 0, 0, 1, (buffer.numel(),))
    call.tensors[0], call.y, call.threads = buffer.data_ptr(), out.data_ptr(), torch.get_num_threads()
    kernel = library.kernel("read_bytes")
    return buffer.numel() / median_ms(lambda: kernel(call), repeats) / 1e6


def matmulnbits_session(qweight, scales, k: int, n: int, level: int):
    """A one-node ONNX model computing ``x @ W.T`` with MatMulNBits: symmetric int4 codes, uint8 zero points 8."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    blocks = scales.shape[1]
    zero_points = torch.full((n, (blocks + 1) // 2), 0x88, dtype=torch.uint8)
    initializers = [
        numpy_helper.from_array(qweight.reshape(n, blocks, GROUP // 2).numpy(), "B"),
        numpy_helper.from_array(scales.reshape(-1).numpy(), "scales"),
        numpy_helper.from_array(zero_points.reshape(-1).numpy(), "zero_points"),
    ]
    node = helper.make_node("MatMulNBits", ["A", "B", "scales", "zero_points"], ["Y"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=GROUP, accuracy_level=level)  # fmt: skip
    graph = helper.make_graph(
        [node], "nbits", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], initializers,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def prepare(k: int, n: int):
    """Dense and packed forms of one random weight, plus torch's and onnxruntime's packings of the same codes."""
    weight = torch.randn(n, k) * 0.02
    ours = {}
    for name in OURS:
        scheme = parse_scheme(name)
        ours[name] = (scheme, scheme.pack(scheme.quantize(weight)))
    int4, p4 = ours["int4-g128"]
    codes4 = int4.unpack(p4, k).codes.to(torch.int32)
    # torch's int4: w = (u - 8) * scale + offset; ours: w = (u - zero) * scale, so offset = (8 - zero) * scale.
    scales_and_zeros = torch.stack([p4.scales, (8 - p4.get("zeros")) * p4.scales], -1).transpose(0, 1).contiguous()
    sym = ours["int4-g128-sym"][1]
    return {
        "weight": weight, "ours": ours,
        "torch_int4": (torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes4, 1), scales_and_zeros.bfloat16()),
        "torch_int8": (ours["int8"][1].qweight, ours["int8"][1].scales.reshape(-1).bfloat16()),
        "ort": {level: matmulnbits_session(sym.qweight, sym.scales, k, n, level) for level in (1, 4)},
    }  # fmt: skip


qlinear = torch.ops.qcompile.linear


def bench_shape(k: int, n: int, tokens: list[int], repeats: int, read_gbs: float) -> None:
    data = prepare(k, n)
    w32, wbf = data["weight"], data["weight"].bfloat16()
    int4_codes, int4_meta = data["torch_int4"]
    print(f"\n## K={k} N={n}  (times in ms)")
    header = ["M", "fp32 F.linear", "bf16 F.linear", "torch int8", "torch int4", "ORT L1", "ORT L4"]
    header += [f"{name} {dt}" for name in OURS for dt in ("f32", "bf16")]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    results = []
    for m in tokens:
        x32 = torch.randn(m, k)
        xbf, x_np = x32.bfloat16(), x32.numpy()
        t = {
            "fp32": median_ms(lambda: F.linear(x32, w32), repeats),
            "bf16": median_ms(lambda: F.linear(xbf, wbf), repeats),
            "t8": median_ms(lambda: torch.ops.aten._weight_int8pack_mm(xbf, *data["torch_int8"]), repeats),
            "t4": median_ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xbf, int4_codes, GROUP, int4_meta),
                            repeats),  # fmt: skip
            "ort1": median_ms(lambda: data["ort"][1].run(None, {"A": x_np}), repeats),
            "ort4": median_ms(lambda: data["ort"][4].run(None, {"A": x_np}), repeats),
        }
        for name, (scheme, p) in data["ours"].items():
            for dt, x in (("f32", x32), ("bf16", xbf)):
                t[f"{name} {dt}"] = median_ms(lambda: qlinear(x, p.list(), None, scheme.name, k, n), repeats)
        print(f"| {m} | " + " | ".join(f"{v:.3f}" for v in t.values()) + " |", flush=True)
        results.append((m, t))
    print("\nRatios (baseline time / ours; > 1: ours is faster); path: direct kernel or GEMM path at this M")
    cols = ["M", "path bf16 (int4 / w8a8 / w4a8)", "int4 bf16 vs bf16 F.linear", "int4 f32 vs fp32 F.linear",
            "int4 bf16 vs torch int4", "int4-sym f32 vs ORT L1", "int8 bf16 vs torch int8", "int8 bf16 vs bf16 F.linear",
            "w8a8 bf16 vs bf16 F.linear", "w8a8 f32 vs fp32 F.linear", "w4a8 bf16 vs torch int4",
            "w4a8 f32 vs ORT L4"]  # fmt: skip
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for m, t in results:
        path = " / ".join("GEMM" if m >= gemm_path.min_tokens(KIND[s], torch.bfloat16) else "direct"
                          for s in ("int4-g128", "w8a8", "w4a8-g128"))  # fmt: skip
        cells = [t["bf16"] / t["int4-g128 bf16"], t["fp32"] / t["int4-g128 f32"], t["t4"] / t["int4-g128 bf16"],
                 t["ort1"] / t["int4-g128-sym f32"], t["t8"] / t["int8 bf16"], t["bf16"] / t["int8 bf16"],
                 t["bf16"] / t["w8a8 bf16"], t["fp32"] / t["w8a8 f32"], t["t4"] / t["w4a8-g128 bf16"],
                 t["ort4"] / t["w4a8-g128 f32"]]  # fmt: skip
        print(f"| {m} | {path} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    m1 = dict(results).get(1)
    if m1 is not None:
        print(f"\nM=1 weight read rate (GB/s), read-only bandwidth {read_gbs:.1f} GB/s:")
        for name, (scheme, p) in data["ours"].items():
            for dt in ("f32", "bf16"):
                rate = p.nbytes / m1[f"{name} {dt}"] / 1e6
                print(f"  {name} {dt}: {rate:.1f} GB/s ({rate / read_gbs:.0%} of read bandwidth)")
        nbytes4 = int4_codes.numel() * int4_codes.element_size() + int4_meta.numel() * 2
        print(f"  torch int4 bf16: {nbytes4 / m1['t4'] / 1e6:.1f} GB/s")


CROSSOVER_TOKENS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)
CROSSOVER_SCHEMES = {"weight-only": ("int4-g128", "int8"), "w8a8": ("w8a8",), "w4a8": ("w4a8-g128",)}


def path_ms(scheme, p, x, k: int, n: int, min_tokens: int, repeats: int) -> float:
    """One call's median time with ``$QCOMPILE_GEMM_MIN_TOKENS`` at ``min_tokens`` (1: GEMM path; huge: direct)."""
    from qcompile.runtime import dispatch

    os.environ[gemm_path.ENV] = str(min_tokens)
    dispatch.forget_choices()
    try:
        return median_ms(lambda: qlinear(x, p.list(), None, scheme.name, k, n), repeats)
    finally:
        del os.environ[gemm_path.ENV]
        dispatch.forget_choices()


def crossover(k: int, n: int, repeats: int) -> None:
    """Per kind of call and activation dtype, the direct kernel against the GEMM path at each M, and the first M
    from which the GEMM path stays faster: the value ``gemm_path.CROSSOVER`` holds for this machine class."""
    weight = torch.randn(n, k) * 0.02
    print(f"\n## Crossover, K={k} N={n}, machine class {gemm_path.machine_class()} (ms: direct / GEMM path)")
    header = ["kind", "scheme", "dtype", *(f"M={m}" for m in CROSSOVER_TOKENS), "GEMM from", "table"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for kind, names in CROSSOVER_SCHEMES.items():
        for name in names:
            scheme = parse_scheme(name)
            p = scheme.pack(scheme.quantize(weight))
            for dtype in (torch.float32, torch.bfloat16):
                cells, wins = [], []
                for m in CROSSOVER_TOKENS:
                    x = torch.randn(m, k, dtype=dtype)
                    direct = path_ms(scheme, p, x, k, n, 1 << 30, repeats)
                    gemm = path_ms(scheme, p, x, k, n, 1, repeats)
                    cells.append(f"{direct:.2f} / {gemm:.2f}")
                    wins.append(gemm < direct)
                first = next((m for i, m in enumerate(CROSSOVER_TOKENS) if all(wins[i:])), None)
                table = gemm_path.CROSSOVER.get((kind, dtype, gemm_path.machine_class()), gemm_path.DEFAULT)
                print(f"| {kind} | {name} | {str(dtype)[6:]} | " + " | ".join(cells)
                      + f" | {first or 'never'} | {table} |", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4096x4096 with M in 1 and 32 only")
    parser.add_argument("--crossover", action="store_true", help="direct kernel against GEMM path per M (4096x4096)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per cell (median reported)")
    args = parser.parse_args()
    repeats = args.repeats or (7 if args.quick else 15)
    shapes, tokens = (FULL_SHAPES[:1], [1, 32]) if args.quick else (FULL_SHAPES, FULL_TOKENS)
    torch.manual_seed(0)
    library.load()
    missing = [isa for isa in library.ISAS if isa not in library.available_isas()]
    if not library.cpu_supports("avx512bf16"):
        missing.append("avx512 + AVX512-BF16 (linear_wo_bf16)")
    print(f"# qcompile CPU kernels — torch {torch.__version__}, {torch.get_num_threads()} threads, active ISA "
          f"{library.active_isa()} (machine class {gemm_path.machine_class()}); variants this CPU cannot run: "
          f"{', '.join(missing) or 'none'}")
    if args.crossover:
        crossover(*FULL_SHAPES[0], repeats)
        return
    read_gbs = read_bandwidth_gbs(repeats)
    print(f"read-only bandwidth: {read_gbs:.1f} GB/s")
    for k, n in shapes:
        bench_shape(k, n, tokens, repeats, read_gbs)


if __name__ == "__main__":
    main()
