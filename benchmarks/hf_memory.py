"""Peak memory of ``from_pretrained`` for SmolLM2-135M: float, and quantized while loading (``QCompileConfig``).

    python benchmarks/hf_memory.py [--dtype float32|bfloat16] [--recipe int4-g128] [--dir DIR]

The float model (``qcompile.models.load_smollm2``) is saved once with ``save_pretrained`` (safetensors). Each case
then runs in a fresh process, which reports from ``/proc/self/status``:

* ``VmHWM``: peak resident set, file pages included (transformers reads safetensors through ``mmap``, so the pages
  of the checkpoint read so far count while the file is open);
* ``anon``: peak anonymous memory (the tensors the process made), sampled every millisecond from ``RssAnon``;
* ``base``: both after the imports, before loading (torch and transformers themselves).

``+load`` columns are peak minus base: what loading the model cost; ``+fwd`` is ``VmHWM`` minus base after one
forward pass (a float model loaded through ``mmap`` is read from the file only when it is used, so its load alone
looks cheap). ``model`` is the bytes of the loaded model's state (parameters and buffers, tied ones once); the
float checkpoint's size is printed above the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

MIB = 1 << 20


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon"):
                out[key] = int(value.split()[0]) * 1024
    return out


class _AnonPeak:
    """Samples ``RssAnon`` in a thread until stopped; ``peak`` is the largest value seen."""

    def __init__(self, period_s: float = 0.001):
        self.peak, self._stop, self._period = _status()["RssAnon"], threading.Event(), period_s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _status()["RssAnon"])
            time.sleep(self._period)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status()["RssAnon"])
        return self.peak


def run_case(path: str, recipe: str | None) -> dict:
    """Load ``path`` (quantized while loading when ``recipe`` is given) and report memory; runs in the child."""
    import torch
    from transformers import AutoModelForCausalLM

    import qcompile  # noqa: F401  (the plug-in)
    from qcompile.hf import QCompileConfig

    kwargs = {"quantization_config": QCompileConfig(recipe=recipe)} if recipe else {}
    base = _status()
    sampler = _AnonPeak()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    seconds = time.perf_counter() - start
    anon = sampler.stop()
    peak = _status()
    state = model.state_dict()
    seen, model_bytes = set(), 0
    for tensor in state.values():  # tied tensors once
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            model_bytes += tensor.numel() * tensor.element_size()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    return {"case": f"qcompile {recipe}" if recipe else "float", "load_s": seconds, "model": model_bytes,
            "VmHWM": peak["VmHWM"], "anon": anon, "base_VmHWM": base["VmHWM"], "base_anon": base["RssAnon"],
            "forward_VmHWM": _status()["VmHWM"]}  # fmt: skip


def save_float(path: str, dtype: str) -> int:
    import torch

    from qcompile.models import load_smollm2

    model, tokenizer = load_smollm2(getattr(torch, dtype))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--recipe", default="int4-g128")
    parser.add_argument("--dir", default=None, help="where to save the float checkpoint (default: a temp folder)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case is not None:  # the child process
        print(json.dumps(run_case(args.dir, args.case or None)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = args.dir or os.path.join(tmp, "smollm2")
        checkpoint = save_float(path, args.dtype)
        rows = []
        for recipe in ("", args.recipe):
            command = [sys.executable, __file__, "--dir", path, "--case", recipe]
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"SmolLM2-135M, {args.dtype} safetensors checkpoint: {checkpoint / MIB:.0f} MiB")
    print(f"{'case':<20} {'model':>6} {'VmHWM':>6} {'+load':>6} {'anon':>6} {'+load':>6} {'+fwd':>6} {'load s':>6}"
          "   (MiB)")
    for r in rows:
        print(f"{r['case']:<20} {r['model'] / MIB:6.0f} {r['VmHWM'] / MIB:6.0f} "
              f"{(r['VmHWM'] - r['base_VmHWM']) / MIB:6.0f} {r['anon'] / MIB:6.0f} "
              f"{(r['anon'] - r['base_anon']) / MIB:6.0f} {(r['forward_VmHWM'] - r['base_VmHWM']) / MIB:6.0f} "
              f"{r['load_s']:6.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
