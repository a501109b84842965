"""Streaming quantization (``qcompile.hf.streaming.quantize_checkpoint``) of a checkpoint several times larger than
the memory it is allowed.

    python benchmarks/streaming_memory.py [--layers 34 --hidden 2048 --intermediate 5632] [--budget-mib 1024]
                                          [--gptq-layers 2] [--dir /tmp] [--keep]

A synthetic float Llama checkpoint in bfloat16 is written (random weights: windows of one random vector, since
the values do not change the memory or the time; source shards of ``--shard-mib``). Each case then runs in a fresh
process which, after its imports and a small warm-up quantization, limits its own address space
(``RLIMIT_AS``) to what it has mapped so far (``VmPeak``) plus the budget, so any allocation past the budget fails
and the case with it. The address space counts everything mapped, the source shard being read included (one at a
time); the resident set (``VmHWM``, reset to the current RSS once the limit is set) is what the process actually
used. Cases:

* ``rtn``: ``int4-g128``, round to nearest, a tensor at a time;
* ``gptq``: the same with GPTQ on the first ``--gptq-layers`` decoder layers (random token ids as calibration):
  those blocks go through the block-by-block path (read, calibrated, quantized, written, freed), the later ones a
  tensor at a time. Its budget (``--gptq-budget-mib``) is larger: GPTQ itself holds a ``[K, K]`` float64 Hessian
  per layer and, while it factors one, about six such matrices (K = 5632 for ``down_proj`` here: 242 MiB each).

Prints the checkpoint size, the budget, the peak address space and resident set above the baseline, and the time;
the checkpoint and the outputs are deleted afterwards (unless ``--keep``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

MIB = 1 << 20


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmPeak", "VmSize", "VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    return out


def write_checkpoint(path: str, layers: int, hidden: int, intermediate: int, vocab: int, shard_bytes: int) -> int:
    """A bfloat16 Llama checkpoint (GQA with 4 key/value heads of 64, untied head); returns its tensor bytes."""
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=layers, num_attention_heads=hidden // 64, head_dim=64,
                                      num_key_value_heads=4, tie_word_embeddings=False, dtype="bfloat16")  # fmt: skip
    config.save_pretrained(path)
    largest = max(vocab, intermediate) * hidden
    pool = (torch.randn(largest + 8192, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    count = [0]

    def weight(rows, cols):
        count[0] += 1
        start = count[0] * 997 % 8192
        return pool[start : start + rows * cols].reshape(rows, cols).clone()

    tensors = [("model.embed_tokens.weight", lambda: weight(vocab, hidden))]
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (256, hidden), "self_attn.v_proj":
              (256, hidden), "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (intermediate, hidden),
              "mlp.up_proj": (intermediate, hidden), "mlp.down_proj": (hidden, intermediate)}  # fmt: skip
    for layer in range(layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors.append((f"model.layers.{layer}.{norm}.weight", lambda: torch.ones(hidden, dtype=torch.bfloat16)))
        for name, (rows, cols) in shapes.items():
            tensors.append((f"model.layers.{layer}.{name}.weight", lambda r=rows, c=cols: weight(r, c)))
    tensors.append(("model.norm.weight", lambda: torch.ones(hidden, dtype=torch.bfloat16)))
    tensors.append(("lm_head.weight", lambda: weight(vocab, hidden)))
    shards, current, size, total = [], {}, 0, 0  # one shard in memory at a time
    for key, make in tensors:
        tensor = make()
        if current and size + tensor.nbytes > shard_bytes:
            shards.append(_save(path, len(shards) + 1, current))
            current, size = {}, 0
        current[key] = tensor
        size += tensor.nbytes
        total += tensor.nbytes
    shards.append(_save(path, len(shards) + 1, current))
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for i, keys in enumerate(shards):
        os.replace(os.path.join(path, f"shard-{i + 1}.tmp"), os.path.join(path, names[i]))
        weight_map.update(dict.fromkeys(keys, names[i]))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return total


def _save(path: str, number: int, tensors: dict) -> list[str]:
    from safetensors.torch import save_file

    save_file(tensors, os.path.join(path, f"shard-{number}.tmp"), metadata={"format": "pt"})
    return list(tensors)


def run_case(source: str, warmup: str, case: str, budget: int, gptq_layers: int, samples: int, vocab: int) -> dict:
    """In the child: the same case on the small ``warmup`` checkpoint first (imports, the code pages of every
    kernel it uses), then the address space limited to VmPeak + budget, stream ``source``, report."""
    import resource

    import torch

    from qcompile.hf.streaming import quantize_checkpoint

    recipe, calibration = "int4-g128", None
    if case == "gptq":
        layers = "|".join(str(i) for i in range(gptq_layers))
        rule = {"targets": [f"re:^model\\.layers\\.({layers})\\."], "scheme": "int4-g128", "algorithm": "gptq"}
        recipe = {"default": "int4-g128", "overrides": [rule]}
        generator = torch.Generator().manual_seed(0)
        calibration = [torch.randint(0, vocab, (1, 128), generator=generator) for _ in range(samples)]
    quantize_checkpoint(warmup, warmup + f"-{case}", recipe, calibration=calibration, progress=False)
    base = _status()
    limit = base["VmPeak"] + budget
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS (Linux 4.0+)
        f.write("5")
    base = _status()
    start = time.perf_counter()
    report = quantize_checkpoint(source, source + f"-{case}", recipe, calibration=calibration, progress=False)
    seconds = time.perf_counter() - start
    end = _status()
    return {"case": case, "seconds": seconds, "limit_over_peak": budget, "base_peak": base["VmPeak"],
            "base_rss": base["VmRSS"], "peak_vm": end["VmPeak"], "peak_rss": end["VmHWM"],
            "written": report.bytes_written, "read": report.bytes_read, "files": len(report.files)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=34)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-mib", type=int, default=256, help="source shard size")
    parser.add_argument("--budget-mib", type=int, default=1024, help="address space allowed above the baseline")
    parser.add_argument("--gptq-budget-mib", type=int, default=3072, help="the same for the gptq case")
    parser.add_argument("--gptq-layers", type=int, default=2, help="layers quantized with GPTQ (0: skip the case)")
    parser.add_argument("--samples", type=int, default=4, help="calibration sequences of 128 tokens")
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the outputs")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", help=argparse.SUPPRESS)
    args = parser.parse_args()
    budgets = {"rtn": args.budget_mib, "gptq": args.gptq_budget_mib}
    if args.case is not None:  # the child process: --dir is the checkpoint
        budget = args.budget_mib * MIB
        result = run_case(args.dir, args.warmup, args.case, budget, args.gptq_layers, args.samples, args.vocab)
        print(json.dumps(result))
        return
    per_layer = 2 * (args.hidden * args.hidden + 256 * args.hidden + 3 * args.hidden * args.intermediate)
    estimate = args.layers * per_layer + 4 * args.vocab * args.hidden
    root = tempfile.mkdtemp(prefix="qcompile-streaming-", dir=args.dir)
    free = shutil.disk_usage(root).free
    if free < 2 * estimate:
        sys.exit(f"{root}: {free / MIB:.0f} MiB free, the checkpoint and its outputs need ~{2 * estimate / MIB:.0f}")
    source, warmup = os.path.join(root, "float"), os.path.join(root, "warmup")
    rows = []
    try:
        write_checkpoint(warmup, max(args.gptq_layers, 1), 256, 512, args.vocab, 1 << 30)
        start = time.perf_counter()
        size = write_checkpoint(source, args.layers, args.hidden, args.intermediate, args.vocab, args.shard_mib * MIB)
        print(f"wrote {source}: {size / MIB:.0f} MiB of bfloat16 in {time.perf_counter() - start:.0f} s "
              f"(hidden {args.hidden}, MLP {args.intermediate}, {args.layers} layers, vocab {args.vocab}, "
              f"{args.shard_mib} MiB shards)", flush=True)  # fmt: skip
        for case in ("rtn", "gptq") if args.gptq_layers else ("rtn",):
            command = [sys.executable, __file__, "--case", case, "--dir", source, "--warmup", warmup, "--budget-mib",
                       str(budgets[case]), "--gptq-layers", str(args.gptq_layers), "--samples", str(args.samples),
                       "--vocab", str(args.vocab)]  # fmt: skip
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_ARENA_MAX": "2"}
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                print(f"{case}: failed under the budget (exit {done.returncode}):\n{done.stderr[-2000:]}")
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{case}: done in {rows[-1]['seconds']:.0f} s", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\ncheckpoint {size / MIB:.0f} MiB; budget: address space above the baseline (VmPeak after warm-up)")
    print(f"{'case':<6} {'budget':>7} {'ckpt/budget':>11} {'base RSS':>9} {'peak RSS':>9} {'+RSS':>6} {'+VM':>6} "
          f"{'written':>8} {'s':>6}   (MiB)")  # fmt: skip
    for r in rows:
        budget = r["limit_over_peak"]
        print(f"{r['case']:<6} {budget / MIB:7.0f} {size / budget:11.1f} {r['base_rss'] / MIB:9.0f} "
              f"{r['peak_rss'] / MIB:9.0f} {(r['peak_rss'] - r['base_rss']) / MIB:6.0f} "
              f"{(r['peak_vm'] - r['base_peak']) / MIB:6.0f} {r['written'] / MIB:8.0f} {r['seconds']:6.0f}")


if __name__ == "__main__":
    main()
