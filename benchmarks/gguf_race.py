"""llama.cpp against qcompile on the same GGUF file, the same machine, the same thread count.

    python benchmarks/gguf_race.py [--gguf FILE] [--threads 2] [--repeats 3] [--decode-tokens 128]
                                   [--forms eager,eager-q8,compiled,decoder,decoder-q8,decoder-compiled] [--llama-bin DIR] [--wait-quiet 1.5]
                                   [--rounds 1]

Default file: the bundled SmolLM2-135M-Instruct GGUF (Q4_1 linears, Q8_0 embedding, tied head). Rows:

* ``llama.cpp``: ``llama-bench -p 128,512 -n DECODE -t THREADS -r REPEATS -fa 0,1``, the faster of flash attention
  off and on per test (its defaults otherwise: F16 KV cache, batch 2048); the tools come from ``--llama-bin``,
  ``$LLAMA_CPP_BIN`` or ``tools/llama_cpp.sh`` (cached build);
* qcompile, each form in its own process (the int8 switch is read once per process), the model from
  ``qcompile.gguf.load`` (the file's blocks kept, float32 activations):
  ``eager`` (the C++ rows' exact float form), ``eager-q8`` (``QCOMPILE_GGUF_Q8=1``: llama.cpp's int8-activation form
  up to 16 tokens, so decode runs as llama.cpp's does), ``compiled`` (``torch.compile(model.forward, dynamic=True,
  backend="qcompile")``; its row says why where it fails), ``decoder`` and ``decoder-q8``
  (:class:`qcompile.decoder.Decoder` on the same model: the same weights and kernels, no transformers code per
  token; exact and int8-activation forms), ``decoder-compiled`` (``torch.compile(decoder, dynamic=True)``: inductor
  fuses the float ops between the quantized linears).

Measured as llama-bench measures: ``pp N`` is one forward of N tokens from an empty cache (logits of the last token
only), ``tg N`` is N single-token steps through the KV cache from an empty one (greedy argmax between steps); the
median of ``REPEATS`` runs after a warm-up, tokens per second. With ``--rounds R`` everything is measured R times,
interleaved, and each cell keeps its best round.

Then where an eager decode step's time goes: every quantized linear of the model replayed alone on one token
(through the module and ``torch.ops.qcompile.linear``, and its C++ kernel alone; median per layer, summed) against
the measured step time (the rest is Python, transformers' modules and the small float ops), and the linears' bytes
per token against the machine's read bandwidth (a read-only kernel on 256 MiB).
Run it on a quiet machine: llama.cpp's threads meet at a spinning barrier after every op, so another busy process
on the same cores slows it several times over (qcompile's eager forms much less); ``--wait-quiet L`` waits (up to an
hour) for a one-minute load average below ``L`` before starting, and the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORMS = ("eager", "eager-q8", "compiled", "decoder", "decoder-q8", "decoder-compiled")
PROMPTS = (128, 512)


def llama_bin_dir(given: str | None) -> Path:
    if given or os.environ.get("LLAMA_CPP_BIN"):
        return Path(given or os.environ["LLAMA_CPP_BIN"])
    done = subprocess.run([str(ROOT / "tools" / "llama_cpp.sh")], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"tools/llama_cpp.sh failed:\n{done.stderr[-3000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def llama_bench(bin_dir: Path, path: str, threads: int, repeats: int, decode: int) -> dict:
    """``{"pp128": tok/s, "pp512": tok/s, "tgN": tok/s}`` from ``llama-bench -o json``, flash attention off and on,
    the faster of the two per test."""
    args = [str(bin_dir / "llama-bench"), "-m", path, "-p", ",".join(map(str, PROMPTS)), "-n", str(decode),
            "-t", str(threads), "-r", str(repeats), "-fa", "0,1", "-o", "json"]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"llama-bench failed ({done.returncode}):\n{done.stderr[-3000:]}")
    out = {}
    for test in json.loads(done.stdout):
        key = f"pp{test['n_prompt']}" if test["n_prompt"] else f"tg{test['n_gen']}"
        out[key] = max(out.get(key, 0.0), float(test["avg_ts"]))
    return out


# -- one qcompile form, in a child process ---------------------------------------------------------------------------
def median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_steps(model, tokens: int, first: int = 1) -> None:
    """``tokens`` single-token steps through transformers' KV cache from an empty one, greedy."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    token = torch.tensor([[first]])
    for _ in range(tokens):
        logits = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1, keepdim=True)


def read_bandwidth_gbs(repeats: int) -> float:
    """Bytes per second the library's read-only kernel streams from a 256 MiB buffer."""
    import torch

    from qcompile.codegen.cpp import launch, library

    buffer = torch.ones(256 << 20, dtype=torch.uint8)
    out = torch.empty(8, dtype=torch.int64)
    call = launch.template("read_bytes", 0, 0, 1, (buffer.numel(),))
    call.tensors[0], call.y, call.threads = buffer.data_ptr(), out.data_ptr(), torch.get_num_threads()
    kernel = library.kernel("read_bytes")
    return buffer.numel() / median_s(lambda: kernel(call), repeats) / 1e9


def linear_breakdown(model, repeats: int, q8: bool) -> dict:
    """Every quantized linear replayed alone on one token, summed medians: through the module (``QuantizedLinear``,
    the op's dispatch, the kernel) and the kernel alone (launched through ctypes); and the packed bytes read."""
    import torch

    from qcompile.codegen.cpp import gguf
    from qcompile.nn import QuantizedLinear
    from qcompile.schemes import parse_scheme

    out = {"linears": 0, "linear_s": 0.0, "kernel_s": 0.0, "linear_bytes": 0}
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, QuantizedLinear):
                continue
            x = torch.randn(1, 1, module.in_features)
            packed = list(module.packed())
            kernel = gguf.direct_launcher(parse_scheme(module.scheme), x, module.out_features,
                                          "linear_gguf_q8" if q8 else "linear_gguf")  # fmt: skip
            out["linear_s"] += median_s(lambda: module(x), repeats)
            out["kernel_s"] += median_s(lambda: kernel(x, packed, None), repeats)
            out["linear_bytes"] += sum(t.numel() * t.element_size() for t in packed)
            out["linears"] += 1
    return out


def decoder_steps(decoder, tokens: int, first: int = 1) -> None:
    """``tokens`` single-token steps of a :class:`qcompile.decoder.Decoder` from an empty cache, greedy."""
    import torch

    token = torch.tensor([[first]])
    for position in range(tokens):
        token = decoder.step(token, position).argmax(-1, keepdim=True)


def worker(form: str, path: str, threads: int, repeats: int, decode: int) -> dict:
    if form.endswith("-q8"):
        os.environ["QCOMPILE_GGUF_Q8"] = "1"
    import warnings

    import torch

    import qcompile.gguf

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    model, _ = qcompile.gguf.load(path)
    model.eval()
    out = {}
    if form == "compiled":
        start = time.perf_counter()
        model.forward = torch.compile(model.forward, dynamic=True, backend="qcompile")
        try:
            with torch.no_grad():
                model(input_ids=torch.ones(1, 16, dtype=torch.long), use_cache=False, logits_to_keep=1)
                decode_steps(model, 2)
        except Exception as error:  # noqa: BLE001  (the row reports it)
            return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
        out["compile_s"] = time.perf_counter() - start
    ids = torch.randint(100, 40000, (1, max(PROMPTS)), generator=torch.Generator().manual_seed(0))
    if form.startswith("decoder"):
        from qcompile.decoder import Decoder

        decoder = Decoder(model, max_length=max(max(PROMPTS), decode) + 1)
        if form == "decoder-compiled":
            start = time.perf_counter()
            decoder = torch.compile(decoder, dynamic=True)
            for n in (*PROMPTS, 1):
                decoder(ids[:, :n], 0)
            decoder_steps(decoder, 3)
            out["compile_s"] = time.perf_counter() - start
        for n in PROMPTS:
            out[f"pp{n}"] = n / median_s(lambda: decoder.step(ids[:, :n], 0), repeats)
        out[f"tg{decode}"] = decode / median_s(lambda: decoder_steps(decoder, decode), repeats)
        return out
    with torch.no_grad():
        for n in PROMPTS:
            step = lambda: model(input_ids=ids[:, :n], use_cache=False, logits_to_keep=1)  # noqa: E731
            out[f"pp{n}"] = n / median_s(step, repeats)
        out[f"tg{decode}"] = decode / median_s(lambda: decode_steps(model, decode), repeats)
    if form != "compiled":
        out.update(linear_breakdown(model, max(repeats, 5), form == "eager-q8"))
        out["read_gbs"] = read_bandwidth_gbs(max(repeats, 5))
    return out


def run_form(form: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", form, "--gguf", args.gguf, "--threads", str(args.threads),
               "--repeats", str(args.repeats), "--decode-tokens", str(args.decode_tokens)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"error": f"exit {done.returncode}: {(done.stderr.strip().splitlines() or ['?'])[-1][:160]}"}
    return json.loads(lines[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=None, help="the GGUF file (default: the bundled SmolLM2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--forms", default=",".join(FORMS))
    parser.add_argument("--llama-bin", default=None)
    parser.add_argument("--rounds", type=int, default=1, help="measure everything this many times, keep the best")
    parser.add_argument("--wait-quiet", type=float, default=None, help="wait for a load average below this")
    parser.add_argument("--worker", choices=FORMS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.gguf is None:
        from qcompile.models import smollm2_gguf_path

        args.gguf = str(smollm2_gguf_path())
    if args.worker:
        print(json.dumps(worker(args.worker, args.gguf, args.threads, args.repeats, args.decode_tokens)))
        return 0

    from qcompile.report import format_table

    if args.wait_quiet is not None:
        deadline = time.time() + 3600
        while os.getloadavg()[0] >= args.wait_quiet and time.time() < deadline:
            time.sleep(15)
    print(f"# load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs, {args.threads} threads, "
          f"{args.rounds} round(s); {args.gguf}")  # fmt: skip
    tg = f"tg{args.decode_tokens}"
    keys = [*(f"pp{n}" for n in PROMPTS), tg]
    bin_dir = llama_bin_dir(args.llama_bin)
    results: dict[str, dict] = {}
    for _ in range(args.rounds):  # interleaved; each cell keeps its best round (a busy moment only slows a run)
        measured = {"llama.cpp": llama_bench(bin_dir, args.gguf, args.threads, args.repeats, args.decode_tokens)}
        print("llama.cpp", measured["llama.cpp"], flush=True)
        for form in args.forms.split(","):
            measured[f"qcompile {form}"] = run_form(form, args)
            print(form, measured[f"qcompile {form}"], flush=True)
        for name, r in measured.items():
            best = results.setdefault(name, r)
            if "error" in best or "error" in r:
                continue
            for key, value in r.items():
                faster = value < best[key] if key.endswith("_s") else value > best[key]
                best[key] = value if faster else best[key]
    base = results["llama.cpp"]
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, *["-"] * len(keys), r["error"]])
            continue
        cells = [f"{r[k]:.1f}" + ("" if name == "llama.cpp" else f" ({r[k] / base[k]:.2f}x)") for k in keys]
        rows.append([name, *cells, f"compiled in {r['compile_s']:.0f} s" if "compile_s" in r else ""])
    print()
    print(format_table(["", *(f"{k} tok/s" for k in keys), ""], rows, "l" + "r" * len(keys) + "l"))
    print("(x): against llama.cpp")
    for name, r in results.items():
        if "linear_s" not in r:
            continue
        step = 1.0 / r[tg]
        floor = r["linear_bytes"] / (r["read_gbs"] * 1e9)
        print(f"\n{name}, one decode step {step * 1e3:.2f} ms: its {r['linears']} quantized linears replayed alone "
              f"{r['linear_s'] * 1e3:.2f} ms ({r['linear_s'] / step:.0%}; their kernels alone "
              f"{r['kernel_s'] * 1e3:.2f} ms), the rest (Python, transformers, float ops) "
              f"{(step - r['linear_s']) * 1e3:.2f} ms; the linears read {r['linear_bytes'] / 1e6:.1f} MB a token: "
              f"the kernels at {r['linear_bytes'] / r['kernel_s'] / 1e9:.1f} GB/s against {r['read_gbs']:.1f} GB/s "
              f"read bandwidth (floor {floor * 1e3:.2f} ms)")  # fmt: skip
    print(f"llama.cpp, one decode step {1e3 / base[tg]:.2f} ms")
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
