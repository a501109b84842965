"""Where an int4 GEMV's time goes: the same M=1 loop with more and more of the work switched on.

    python benchmarks/gpu_gemv_probe.py [--k 4096] [--n 14336]
    ncu --section SpeedOfLight --section WarpStateStats python benchmarks/gpu_gemv_probe.py --once   # profile

Each mode runs one Triton kernel over the same packed ``int4-g128`` weight (``uint8 [N, K/2]``) with the same
tiles (``BLOCK_N`` 64, ``BLOCK_K`` 128, split-K 8), and prints its time (CUDA-graph replays after an L2 flush,
``autotune.GraphTimer``) and the weight bytes per second:

| mode | work per tile |
|---|---|
| `bytes` | load the ``[BLOCK_K/2, BLOCK_N]`` bytes and add them up as integers: the access pattern alone |
| `words` | the same bytes loaded as int32 words (``[BLOCK_K/8, BLOCK_N]``) |
| `codes` | unpack both nibbles to fp32 (exponent-bit trick) and multiply-add with ``x``: no scales |
| `full` | as the qcompile kernel: codes, ``* scale - zero * scale``, multiply-add with ``x`` |
| `int8` | an int8 ``[N, K]`` weight, converted and multiply-added: the W8A16 loop, for comparison |

If ``bytes`` is already far from the copy bandwidth the layout is the problem; if it is near and ``full`` is
far, the ALU work per nibble is. (The first version of this probe lacked the alignment hint on ``k_begin``:
compiled for sm_90 its byte mode loaded one byte per instruction, which is what its 751 GB/s measured.)
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl

MODES = ("bytes", "words", "codes", "full", "int8")
BLOCK_N, BLOCK_K, SPLIT_K = 64, 128, 8


@triton.jit
def probe_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_qn, stride_sn,
                 MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """``out[n] += sum over this split's K of the mode's work``; grid ``(cdiv(N, BLOCK_N), SPLIT_K)``."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_K // 2)
    offs_w = tl.arange(0, BLOCK_K // 8)
    offs_k = tl.arange(0, BLOCK_K)
    span = K // tl.num_programs(1)
    k_begin = tl.multiple_of(tl.program_id(1) * span, BLOCK_K)  # without it the bytes load one at a time
    rows = q_ptr + offs_n.to(tl.int64)[None, :] * stride_qn
    acc = tl.zeros((BLOCK_K // 2, BLOCK_N), dtype=tl.float32)
    acc_i = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.int32)
    acc8 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_begin + span, BLOCK_K):
        if MODE == 0:
            acc += tl.load(rows + (k0 // 2 + offs_h)[:, None]).to(tl.float32)
        elif MODE == 1:
            words = rows.to(tl.pointer_type(tl.int32), bitcast=True)
            acc_i += tl.load(words + (k0 // 8 + offs_w)[:, None])
        elif MODE == 4:
            w = tl.load(rows + (k0 + offs_k)[:, None]).to(tl.int32)
            x = tl.load(x_ptr + k0 + offs_k).to(tl.float32)
            acc8 += x[:, None] * ((((w & 0xFF) ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0)
        else:
            packed = tl.load(rows + (k0 // 2 + offs_h)[:, None]).to(tl.int32)
            low = ((packed & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            high = (((packed >> 4) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            x_even = tl.load(x_ptr + k0 + 2 * offs_h).to(tl.float32)
            x_odd = tl.load(x_ptr + k0 + 2 * offs_h + 1).to(tl.float32)
            if MODE == 3:
                meta = offs_n * stride_sn + k0 // 128
                scale = tl.load(s_ptr + meta)[None, :]
                shift = tl.load(z_ptr + meta)[None, :] * scale
                low = low * scale - shift
                high = high * scale - shift
            acc += x_even[:, None] * low + x_odd[:, None] * high
    total = tl.sum(acc, axis=0) + tl.sum(acc_i, axis=0).to(tl.float32) + tl.sum(acc8, axis=0)
    tl.atomic_add(out_ptr + offs_n, total, mask=offs_n < N)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--n", type=int, default=14336)
    parser.add_argument("--once", action="store_true", help="launch each mode once, untimed (for a profiler)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu_gemv_probe.py needs a CUDA GPU; nothing was measured.", file=sys.stderr)
        return 2
    from qcompile.codegen.triton.autotune import GraphTimer

    k, n = args.k, args.n
    assert k % (BLOCK_K * SPLIT_K) == 0 and n % BLOCK_N == 0, "K must split into whole tiles, N into whole blocks"
    device = torch.device("cuda")
    qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
    weight8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
    scales = torch.rand(n, k // 128, device=device)
    zeros = torch.rand(n, k // 128, device=device) * 15
    x = torch.randn(k, device=device, dtype=torch.bfloat16)
    out = torch.zeros(n, device=device)
    timer = None if args.once else GraphTimer(device)
    print(f"# {torch.cuda.get_device_name()}, triton {triton.__version__}: M=1, K={k}, N={n}, "
          f"BLOCK_N {BLOCK_N}, BLOCK_K {BLOCK_K}, split-K {SPLIT_K}")  # fmt: skip
    for mode, name in enumerate(MODES):
        weight = weight8 if name == "int8" else qweight

        def launch(mode=mode, weight=weight):
            probe_kernel[(n // BLOCK_N, SPLIT_K)](
                x, weight, scales, zeros, out, n, k, weight.stride(0), scales.stride(0),
                MODE=mode, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4, num_stages=4,
            )  # fmt: skip

        if args.once:
            launch()
            torch.cuda.synchronize()
            print(f"{name:>6}: launched once")
            continue
        ms = timer.time(launch)
        nbytes = weight.numel() * weight.element_size()
        print(f"{name:>6}: {ms * 1e3:8.1f} us  {nbytes / ms / 1e6:7.0f} GB/s of weight", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
