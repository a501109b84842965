"""SmolLM2-135M on CPU, end to end: prefill and decode speed of float bf16 / fp32 against qcompile schemes.

    python benchmarks/e2e_cpu.py [--schemes int8,int4-g128,w4a8-g128] [--prefill 512] [--new-tokens 32]
                                 [--batches 1,8] [--dtypes bfloat16,float32] [--inductor] [--rounds 7]

Per activation dtype (``bfloat16``: the fast float baseline where the CPU has AMX or AVX512-BF16; ``float32``):
the float model, then each scheme through ``torch.compile(model, backend="qcompile", options={"recipe": scheme})``
(``dynamic=True``: one compilation across sequence lengths; ``--inductor`` also fuses the rest of the graph with
inductor, minutes per row). Columns:

- prefill tokens/s: one forward of ``--prefill`` tokens (batch 1, no cache), the median of 3 after a warm-up; with
  ``--rounds R`` each scheme's forward alternates with the float model's for R rounds, and its ratio is against the
  float medians of those same rounds (``--inductor`` keeps the plain medians: the float row is compiled too);
- decode tokens/s at each batch of ``--batches``: greedy ``generate`` with the KV cache, ``--new-tokens`` tokens per
  sequence (the end-of-sequence token off), tokens of all sequences per second;
- ratios against the float model of the same dtype, and quantized bfloat16 prefill against float bfloat16.

The machine's ISA, thread count and the GEMM crossovers in use are printed first.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

import qcompile  # noqa: F401
from qcompile.codegen.cpp import gemm_path, library
from qcompile.models import eval_text, load_smollm2
from qcompile.report import format_table

SCHEMES = ("int8", "int4-g128", "w4a8-g128")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def prefill_seconds(model, ids: torch.Tensor, runs: int) -> list[float]:
    with torch.no_grad():
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model(ids, use_cache=False)
            times.append(time.perf_counter() - start)
    return times


def prefill_tps(model, ids: torch.Tensor) -> float:
    prefill_seconds(model, ids, 1)
    return ids.numel() / statistics.median(prefill_seconds(model, ids, 3))


def interleaved_prefill_tps(float_model, model, ids: torch.Tensor, rounds: int) -> tuple[float, float]:
    """Prefill tokens/s of ``float_model`` and ``model``, one forward of each per round for ``rounds`` rounds
    (medians): both see the same machine state, so their ratio holds on a noisy machine."""
    prefill_seconds(float_model, ids, 1)
    prefill_seconds(model, ids, 1)
    times = ([], [])
    for _ in range(rounds):
        for out, m in zip(times, (float_model, model)):
            out += prefill_seconds(m, ids, 1)
    return ids.numel() / statistics.median(times[0]), ids.numel() / statistics.median(times[1])


def decode_tps(model, prompt: torch.Tensor, batch: int, new_tokens: int) -> float:
    ids = prompt.repeat(batch, 1)
    kwargs = dict(do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    return batch * new_tokens / (time.perf_counter() - start)


def compiled(model, scheme: str | None, inductor: bool):
    torch._dynamo.reset()  # every row compiles afresh: forward's code object is shared by the model copies
    if scheme is None:
        if inductor:
            model.forward = torch.compile(model.forward, dynamic=True)
        return model
    options = {"recipe": scheme, "inductor": inductor}
    model.forward = torch.compile(model.forward, dynamic=True, backend="qcompile", options=options)
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--inductor", action="store_true", help="inductor for the rest of the graph (minutes a row)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="prefill of each scheme interleaved with the float model's, this many rounds (medians)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    batches = [int(b) for b in args.batches.split(",")]
    print(f"# CPU: isa {library.active_isa()}, machine class {gemm_path.machine_class()}, "
          f"AVX512-BF16 {library.cpu_supports('avx512bf16')}, {torch.get_num_threads()} threads; GEMM path from "
          + ", ".join(f"{kind} {gemm_path.min_tokens(kind, torch.bfloat16)} (bf16) / "
                      f"{gemm_path.min_tokens(kind, torch.float32)} (fp32) tokens" for kind in gemm_path.KINDS))

    base, tokenizer = load_smollm2()
    ids = tokenizer(eval_text(), return_tensors="pt").input_ids[:, : args.prefill]
    prompt = tokenizer("The three witches met Macbeth on the heath and", return_tensors="pt").input_ids
    rows, float_rates, float_models = [], {}, {}
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        for scheme in [None, *args.schemes.split(",")]:
            model = compiled(copy.deepcopy(base).to(dtype), scheme, args.inductor)
            if scheme is not None and dtype_name in float_models:  # eager float model: it never shares a compile
                float_tps, tps = interleaved_prefill_tps(float_models[dtype_name], model, ids, args.rounds)
            else:
                float_tps = tps = prefill_tps(model, ids)
            rates = [tps] + [decode_tps(model, prompt, b, args.new_tokens) for b in batches]
            if scheme is None:
                float_rates[dtype_name] = rates
                if args.rounds > 1 and not args.inductor:
                    float_models[dtype_name] = model
            else:
                del model
            reference = [float_tps, *float_rates[dtype_name][1:]]
            row = [f"{scheme or 'float'} ({dtype_name})"]
            for rate, ref in zip(rates, reference):
                row.append(f"{rate:.0f} ({rate / ref:.2f}x)")
            bf16 = float_tps if dtype_name == "bfloat16" else float_rates.get("bfloat16", [None])[0]
            row.append(f"{rates[0] / bf16:.2f}x" if bf16 else "-")
            rows.append(row)
            print(row, flush=True)
    print()
    print(f"SmolLM2-135M, prefill of {ids.shape[1]} tokens, decode of {args.new_tokens} tokens per sequence, "
          f"{'inductor' if args.inductor else 'op by op'} around the quantized ops; (x): against float, same dtype")
    headers = ["model", f"prefill {ids.shape[1]} tok/s", *(f"decode b{b} tok/s" for b in batches),
               "prefill vs float bf16"]  # fmt: skip
    print(format_table(headers, rows, "l" + "r" * (len(headers) - 1)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
