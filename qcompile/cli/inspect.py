"""``qcompile inspect``, ``verify`` and ``report``: what a ``.qpt`` file holds, whether it is intact, and a
per-layer report of a quantization."""

from __future__ import annotations

import math
import os
import time

from qcompile.cli.common import FAILED, OK, example_inputs, load_model, say
from qcompile.cli.quantize import calibration_for


def cmd_inspect(args) -> tuple[int, dict]:
    from qcompile.report import format_table, human_bytes
    from qcompile.runtime.qpt_reader import read_artifact

    artifact = read_artifact(args.file, verify=False)
    manifest = artifact.manifest
    rows, layers = [], []
    from qcompile.runtime.qpt_manifest import plan_from_json

    plan = plan_from_json(manifest.get("plan"), manifest.get("recipe"))
    for entry in plan:
        site = entry.site
        layers.append({"name": site.name, "scheme": entry.scheme, "shape": [site.out_features, site.in_features],
                       "bytes_before": site.weight_bytes, "bytes_after": entry.bytes_after})  # fmt: skip
        rows.append([site.name, entry.scheme or f"keep ({site.weight_dtype})",
                     f"{site.out_features}x{site.in_features}", human_bytes(site.weight_bytes),
                     human_bytes(entry.bytes_after)])  # fmt: skip
    before, after = plan.bytes_before, plan.bytes_after
    quantized = f"{len(plan.quantized())}/{len(plan)} quantized"
    rows.append(["total", quantized, "", human_bytes(before), human_bytes(after)])
    fmt = manifest["format"]
    result = {"file": args.file, "bytes": artifact.size, "format": f"{fmt['major']}.{fmt['minor']}",
              "writer": manifest.get("writer", {}), "metadata": manifest.get("metadata", {}),
              "members": [{k: r[k] for k in ("name", "kind", "offset", "size")} for r in manifest["members"]],
              "inputs": manifest.get("inputs"), "layers": layers, "bytes_before": before,
              "bytes_after": after}  # fmt: skip
    if not args.json:
        writer = manifest.get("writer", {})
        print(f"{args.file}: .qpt {result['format']}, {human_bytes(artifact.size)}, written by qcompile "
              f"{writer.get('qcompile')} (torch {writer.get('torch')})")  # fmt: skip
        print(format_table(["site", "scheme", "N x K", "before", "after"], rows, "lllrr"))
    return OK, result


def cmd_verify(args) -> tuple[int, dict]:
    import torch
    import torch.utils._pytree as pytree

    from qcompile.export import load
    from qcompile.runtime.qpt_format import ArtifactError

    start = time.perf_counter()
    program = load(args.file, device=args.device)
    result = {"file": args.file, "checksums": "ok", "load_seconds": round(time.perf_counter() - start, 3)}
    examples = program.examples
    spec = program.module.graph._codegen.pytree_info.in_spec
    try:
        inputs = [examples[f"input.{i}"] for i in range(sum(k.startswith("input.") for k in examples))]
        expected = [examples[f"output.{i}"] for i in range(sum(k.startswith("output.") for k in examples))]
    except KeyError as error:
        raise ArtifactError(f"{args.file}: examples member: entry {error} is missing (names run 0, 1, …)") from None
    if not inputs:
        result["sample_run"] = "skipped (the file stores no example)"
        return OK, say(args, result)
    if len(inputs) != spec.num_leaves:
        raise ArtifactError(
            f"{args.file}: examples member holds {len(inputs)} inputs, the graph takes {spec.num_leaves}"
        )
    call_args, call_kwargs = pytree.tree_unflatten([t.to(args.device) for t in inputs], spec)
    with torch.no_grad():
        got = [t.float().cpu() for t in pytree.tree_leaves(program(*call_args, **call_kwargs))]
    worst = 0.0
    for g, e in zip(got, expected):
        if g.shape != e.shape:
            worst = math.inf
            break
        scale = float(e.float().abs().max()) or 1.0
        worst = max(worst, float((g - e.float()).abs().max()) / scale)
    passed = len(got) == len(expected) and worst <= args.tolerance
    result.update({"sample_run": "ok" if passed else "mismatch", "max_relative_error": worst})
    return (OK if passed else FAILED), say(args, result)


def cmd_report(args) -> tuple[int, dict]:
    """The per-layer report (:mod:`qcompile.layer_report`): a model and a recipe (kernel and output error per
    layer), or a ``.qpt`` file (kernel per layer; the error needs the float model)."""
    from qcompile.layer_report import layer_report, report_for_plan

    if os.path.isfile(args.source) and args.source.endswith(".qpt"):
        from qcompile.export import load

        program = load(args.source)
        weights = dict(program.module.named_buffers())
        packed = {}
        for entry, row in zip(program.plan.entries, program.manifest["plan"]):
            if entry.scheme is not None:
                packed[entry.site.name] = [weights[name] for name in row["tensors"].values()]
        report = report_for_plan(program.plan, packed)
    else:
        from qcompile.recipe import load_recipe

        recipe = load_recipe(args.recipe)
        model, tokenizer, task = load_model(args.source)
        inputs = example_inputs(model, tokenizer, task)
        report = layer_report(model, recipe, [inputs], calibration=calibration_for(args, recipe, tokenizer))
    written = {}
    if args.output:
        for suffix, text in ((".txt", report.table()), (".json", report.to_json())):
            with open(args.output + suffix, "w", encoding="utf-8") as handle:
                handle.write(text + "\n")
            written[suffix] = args.output + suffix
        report.plot(args.output + ".png")
        written[".png"] = args.output + ".png"
    if not args.json:
        print(report.table())
        if written:
            print("wrote " + ", ".join(written.values()))
    return OK, {"rows": len(report.rows), "files": list(written.values())}
