"""File size and load time of SmolLM2-135M as ``.qpt`` (int4-g128, int8) against its float safetensors.

    python benchmarks/qpt_load.py [--out-dir DIR] [--repeat 3]

Load times are the median of ``--repeat`` loads in one warm process (imports done, page cache warm):
``safetensors.torch.load_file`` for the float file, ``qcompile.load`` (with and without sha256
verification) for the ``.qpt`` files. Each ``.qpt`` is checked against the in-memory program it came from.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import safetensors.torch
import torch

import qcompile  # noqa: F401  (registers the ops)
from qcompile.export import export, load
from qcompile.models import cache_dir, load_smollm2
from timing import median_ms


def _median_seconds(fn, repeat: int) -> float:
    return median_ms(fn, repeat, warmup=0) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=tempfile.gettempdir())
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer = load_smollm2()
    float_file = cache_dir() / "models" / "smollm2" / "model.safetensors"
    rows = [{"artifact": "float32 safetensors", "bytes": os.path.getsize(float_file),
             "load_s": _median_seconds(lambda: safetensors.torch.load_file(float_file), args.repeat)}]  # fmt: skip
    ids = tokenizer(["The king said to the queen that"], return_tensors="pt")["input_ids"]
    other = tokenizer(["Once upon a time", "there lived a"], return_tensors="pt", padding=True)["input_ids"]
    for scheme in ("int4-g128", "int8"):
        path = os.path.join(args.out_dir, f"smollm2-{scheme}.qpt")
        start = time.perf_counter()
        program = export(model, (), scheme, path, example_kwargs={"input_ids": torch.cat([ids, ids])},
                         progress_bar=False)  # fmt: skip
        export_s = time.perf_counter() - start
        loaded = load(path)
        with torch.no_grad():
            same = torch.equal(program(input_ids=other).logits, loaded(input_ids=other).logits)
        rows.append({"artifact": f".qpt {scheme}", "bytes": os.path.getsize(path), "export_s": export_s,
                     "load_s": _median_seconds(lambda: load(path), args.repeat),
                     "load_noverify_s": _median_seconds(lambda: load(path, verify=False), args.repeat),
                     "outputs_equal": same})  # fmt: skip
    for row in rows:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))


if __name__ == "__main__":
    main()
