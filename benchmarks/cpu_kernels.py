"""CPU kernel benchmark: qcompile's C++ kernels against PyTorch's and onnxruntime's, on the same weights.

    python benchmarks/cpu_kernels.py            # K x N in 4096x4096, 4096x11008, 11008x4096; M in 1, 8, 32, 128
    python benchmarks/cpu_kernels.py --quick    # 4096x4096, M in 1 and 32 (under a minute)

Every timing is the median of ``--repeats`` runs after two warm-up runs, in milliseconds. Baselines:
fp32 / bf16 ``F.linear`` (dense weights), ``aten._weight_int8pack_mm`` and ``aten._weight_int4pack_mm_for_cpu``
(bf16 activations, the same int8 / int4 codes), and onnxruntime ``com.microsoft::MatMulNBits`` (same 4-bit
codes, scales and float zero points, group 128) at ``accuracy_level`` 1 (fp32 compute, as exact as ours) and 4
(activations quantized to int8: faster, less exact); the session option ``session.qdq_matmulnbits_accuracy_level``
is set to the same level. "BW" is the packed weight bytes read per second at M=1, next to a measured copy bandwidth.
Ours are timed through ``torch.ops.qcompile.linear`` (what every entry point calls); ``w4a8`` runs on the very
int4 tensors of ``int4-g128``, with activations quantized per token (compare it with ORT's level 4).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import qcompile  # noqa: F401  (registers torch.ops.qcompile.linear)
from qcompile.codegen.cpp import library
from timing import median_ms
from qcompile.schemes import parse_scheme

FULL_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
FULL_TOKENS = [1, 8, 32, 128]
GROUP = 128


def copy_bandwidth_gbs(repeats: int) -> float:
    src = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() / ms / 1e6  # read + write


def matmulnbits_session(qweight, scales, zeros, k: int, n: int, level: int):
    """A one-node ONNX model computing ``x @ W.T`` with MatMulNBits on our packed int4 codes."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    blocks = scales.shape[1]
    initializers = [
        numpy_helper.from_array(qweight.reshape(n, blocks, GROUP // 2).numpy(), "B"),
        numpy_helper.from_array(scales.reshape(-1).numpy(), "scales"),
        numpy_helper.from_array(zeros.reshape(-1).numpy(), "zero_points"),
    ]
    node = helper.make_node(
        "MatMulNBits", ["A", "B", "scales", "zero_points"], ["Y"], domain="com.microsoft",
        K=k, N=n, bits=4, block_size=GROUP, accuracy_level=level,
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "nbits", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], initializers,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def prepare(k: int, n: int):
    """Dense, int8, int4-g128 and w8a8 forms of one random weight, plus the torch / onnxruntime packings."""
    weight = torch.randn(n, k) * 0.02
    int4, int8, w8a8 = (parse_scheme(s) for s in (f"int4-g{GROUP}", "int8", "w8a8"))
    p4, p8, pw = (s.pack(s.quantize(weight)) for s in (int4, int8, w8a8))
    codes4 = int4.unpack(p4, k).codes.to(torch.int32)
    # torch's int4: w = (u - 8) * scale + offset; ours: w = (u - zero) * scale, so offset = (8 - zero) * scale.
    scales_and_zeros = torch.stack([p4.scales, (8 - p4.get('zeros')) * p4.scales], -1).transpose(0, 1).contiguous()
    return {
        "weight": weight,
        "int4": (int4, p4), "int8": (int8, p8), "w8a8": (w8a8, pw), "w4a8": (parse_scheme(f"w4a8-g{GROUP}"), p4),
        "torch_int4": (torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes4, 1), scales_and_zeros.bfloat16()),
        "torch_int8": (p8.qweight, p8.scales.reshape(-1).bfloat16()),
        "ort": {level: matmulnbits_session(p4.qweight, p4.scales, p4.get('zeros'), k, n, level) for level in (1, 4)},
    }  # fmt: skip


qlinear = torch.ops.qcompile.linear


def bench_shape(k: int, n: int, tokens: list[int], repeats: int, copy_gbs: float) -> None:
    data = prepare(k, n)
    w32, wbf = data["weight"], data["weight"].bfloat16()
    int4_codes, int4_meta = data["torch_int4"]
    print(f"\n## K={k} N={n}  (isa {library.active_isa()}, {torch.get_num_threads()} threads; times in ms)")
    header = (
        "M", "fp32 F.linear", "bf16 F.linear", "torch int8", "torch int4", "ORT nbits L1", "ORT nbits L4",
        "ours int4 f32", "ours int4 bf16", "ours int8 f32", "ours int8 bf16", "ours w8a8 f32", "ours w8a8 bf16",
        "ours w4a8 f32", "ours w4a8 bf16",
    )  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    ratios = []
    for m in tokens:
        x32 = torch.randn(m, k)
        xbf = x32.bfloat16()
        x_np = x32.numpy()
        t = {
            "fp32": median_ms(lambda: F.linear(x32, w32), repeats),
            "bf16": median_ms(lambda: F.linear(xbf, wbf), repeats),
            "t8": median_ms(lambda: torch.ops.aten._weight_int8pack_mm(xbf, *data["torch_int8"]), repeats),
            "t4": median_ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xbf, int4_codes, GROUP, int4_meta),
                            repeats),
            "ort1": median_ms(lambda: data["ort"][1].run(None, {"A": x_np}), repeats),
            "ort4": median_ms(lambda: data["ort"][4].run(None, {"A": x_np}), repeats),
        }
        for key in ("int4", "int8", "w8a8", "w4a8"):
            scheme, p = data[key]
            for suffix, x in (("f32", x32), ("bf16", xbf)):
                t[f"{key} {suffix}"] = median_ms(lambda: qlinear(x, p.list(), None, scheme.name, k, n),
                                                 repeats)  # fmt: skip
        cells = [t[c] for c in ("fp32", "bf16", "t8", "t4", "ort1", "ort4", "int4 f32", "int4 bf16", "int8 f32",
                                "int8 bf16", "w8a8 f32", "w8a8 bf16", "w4a8 f32", "w4a8 bf16")]  # fmt: skip
        print(f"| {m} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
        ratios.append((m, t))
    print("\nSpeed-ups (baseline time / ours; > 1 means ours is faster):")
    print("| M | int4 bf16 vs torch int4 | int4 f32 vs ORT L1 | int4 f32 vs ORT L4 | int8 bf16 vs torch int8 "
          "| int8 f32 vs bf16 | w8a8 f32 vs bf16 F.linear | w8a8 f32 vs fp32 F.linear "
          "| w4a8 f32 vs torch int4 | w4a8 f32 vs ORT L4 | int4 BW GB/s | int8 BW GB/s | w4a8 BW GB/s |")
    print("|" + "---|" * 13)
    p4, p8 = data["int4"][1], data["int8"][1]
    for m, t in ratios:
        bw4 = p4.nbytes / t["int4 f32"] / 1e6
        bw8 = p8.nbytes / t["int8 f32"] / 1e6
        bw48 = p4.nbytes / t["w4a8 f32"] / 1e6
        print(
            f"| {m} | {t['t4'] / t['int4 bf16']:.2f} | {t['ort1'] / t['int4 f32']:.2f} "
            f"| {t['ort4'] / t['int4 f32']:.2f} | {t['t8'] / t['int8 bf16']:.2f} "
            f"| {t['int8 bf16'] / t['int8 f32']:.2f} "
            f"| {t['bf16'] / t['w8a8 f32']:.2f} | {t['fp32'] / t['w8a8 f32']:.2f} "
            f"| {t['t4'] / t['w4a8 f32']:.2f} | {t['ort4'] / t['w4a8 f32']:.2f} "
            f"| {bw4:.1f} | {bw8:.1f} | {bw48:.1f} |"
        )
    print(f"(copy bandwidth: {copy_gbs:.1f} GB/s read+write)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4096x4096 with M in 1 and 32 only (under a minute)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per cell (median reported)")
    args = parser.parse_args()
    repeats = args.repeats or (7 if args.quick else 15)
    shapes, tokens = (FULL_SHAPES[:1], [1, 32]) if args.quick else (FULL_SHAPES, FULL_TOKENS)
    torch.manual_seed(0)
    library.load()
    copy_gbs = copy_bandwidth_gbs(repeats)
    print(f"# qcompile CPU kernels — torch {torch.__version__}, available ISAs {library.available_isas()}")
    for k, n in shapes:
        bench_shape(k, n, tokens, repeats, copy_gbs)


if __name__ == "__main__":
    main()
