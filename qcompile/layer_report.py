"""The per-layer report: which kernel serves each layer on this device, and how much each layer's output moved.

For every site of a plan, one row::

    site, N x K, scheme, bits per weight (scales included), kernel at M=1, kernel at M=128, relative output error

* ``kernel``: the dispatch row that serves a call of that many activation rows on the device (``cpp-w4a16``,
  ``triton-int4-gemv`` …), or ``reference`` with the reason no row serves it (``kept float`` for float layers).
* ``error``: ``‖Y − Ŷ‖ / ‖Y‖`` over the layer's own inputs, where ``Y = X Wᵀ`` is the float layer's output and
  ``Ŷ`` the quantized layer's (the ``qcompile::linear`` op on the same ``X``): the error this layer adds by itself,
  not the error accumulated from the layers before it. ``X`` is what the float model feeds the layer on the
  example or calibration inputs given (for AWQ and SmoothQuant layers, whose producer holds a folded scale, the
  quantized model's own input: their error includes the layers before them).

:func:`layer_report` builds the rows from a float model and a recipe (quantizing a copy, calibration included);
:func:`report_for_quantized` from a float model and its quantized twin; :func:`report_for_plan` from a plan and
packed tensors alone (a ``.qpt`` file: no float weights, so no error column). :meth:`LayerReport.table`,
:meth:`LayerReport.to_json` and :meth:`LayerReport.plot` (a PNG: bits per weight and error per layer; needs
matplotlib) render them.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import torch

from qcompile.report import format_table

#: activation rows the kernel columns are asked for: one decode token, a prefill of 128 tokens
KERNEL_ROWS = (1, 128)
#: rows of each layer's captured input kept for the error (a sample of the example tokens)
MAX_ROWS = 512


@dataclasses.dataclass
class LayerRow:
    site: str
    shape: str
    scheme: str
    bits_per_weight: float
    kernels: dict[int, str]
    error: float | None
    note: str = ""


@dataclasses.dataclass
class LayerReport:
    rows: list[LayerRow]
    device: str

    def table(self) -> str:
        headers = ["site", "N x K", "scheme", "bits/w", *(f"kernel M={m}" for m in KERNEL_ROWS), "rel. error", "note"]
        body = [[r.site, r.shape, r.scheme, f"{r.bits_per_weight:.2f}", *(r.kernels.get(m, "") for m in KERNEL_ROWS),
                 "–" if r.error is None else f"{r.error:.2e}", r.note] for r in self.rows]  # fmt: skip
        return format_table(headers, body, "lllr" + "l" * len(KERNEL_ROWS) + "rl")

    def to_json(self) -> str:
        rows = [{**dataclasses.asdict(r), "kernels": {str(m): k for m, k in r.kernels.items()}} for r in self.rows]
        return json.dumps({"device": self.device, "rows": rows}, indent=1)

    def plot(self, path) -> None:
        """A PNG with two panels over the layers: bits per weight, and relative output error (log scale)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise RuntimeError("the report's plot needs matplotlib: pip install matplotlib") from None
        names = [r.site for r in self.rows]
        positions = range(len(names))
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(min(24.0, max(8.0, 0.22 * len(names))), 7), sharex=True)
        top.bar(positions, [r.bits_per_weight for r in self.rows], color="#4477aa")
        top.set_ylabel("bits per weight")
        top.set_title(f"qcompile per-layer report ({self.device})")
        errors = [r.error if r.error is not None else float("nan") for r in self.rows]
        bottom.bar(positions, errors, color="#cc6677")
        bottom.set_yscale("log")
        bottom.set_ylabel("relative output error")
        step = max(1, -(-len(names) // 80))  # at most about 80 labels; every layer keeps its bar
        bottom.set_xticks(list(positions)[::step], names[::step], rotation=90, fontsize=6)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def kernel_for(entry, packed: list[torch.Tensor], device: torch.device, dtype: torch.dtype, rows: int) -> str:
    """The dispatch row serving ``rows`` activation rows of this site on ``device``, or ``reference (why)``."""
    from qcompile.runtime import dispatch

    scheme = entry.parsed
    x = torch.zeros(rows, entry.site.in_features, device=device, dtype=dtype)
    row, reason = dispatch.select_kernel(scheme, x, [t.to(device) for t in packed])
    return row.name if row is not None else f"reference ({reason})"


def _row(entry, packed, device, dtype, error) -> LayerRow:
    site = entry.site
    shape = f"{site.out_features}x{site.in_features}"
    if entry.scheme is None:
        bits = 8 * site.weight_bytes / max(1, site.out_features * site.in_features)
        return LayerRow(site.name, shape, f"keep ({site.weight_dtype})", bits, {m: "kept float" for m in KERNEL_ROWS},
                        None, entry.note)  # fmt: skip
    bits = entry.parsed.bits_per_weight(site.out_features, site.in_features)
    kernels = {m: kernel_for(entry, packed, device, dtype, m) for m in KERNEL_ROWS} if packed else {}
    return LayerRow(site.name, shape, entry.scheme, bits, kernels, error, entry.note)


def report_for_plan(plan, packed: dict[str, list[torch.Tensor]], device="cpu", dtype=torch.float32,
                    errors: dict[str, float] | None = None) -> LayerReport:  # fmt: skip
    """Rows for ``plan`` given each quantized site's packed tensors (``site name -> tensor list``)."""
    device = torch.device(device)
    errors = errors or {}
    rows = [_row(e, packed.get(e.site.name), device, dtype, errors.get(e.site.name)) for e in plan.entries]
    return LayerReport(rows, str(device))


def _capture_io(model, example_inputs: list[dict], names: set[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``name -> (X, Y)`` of each float linear named in ``names`` (rows flattened, at most :data:`MAX_ROWS`)."""
    captured: dict[str, list] = {n: [] for n in names}
    handles = []
    for name, module in model.named_modules():
        if name in names:
            def hook(_module, args, output, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                captured[name].append((x, output.detach().reshape(-1, output.shape[-1])))

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for inputs in example_inputs:
                model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name, pairs in captured.items():
        if pairs:
            x = torch.cat([p[0] for p in pairs])[:MAX_ROWS]
            y = torch.cat([p[1] for p in pairs])[:MAX_ROWS]
            out[name] = (x, y)
    return out


def report_for_quantized(float_model, quantized_model, example_inputs: list[dict], device="cpu") -> LayerReport:
    """Rows for ``quantized_model`` (a ``qcompile.quantize`` result with its ``qcompile_plan``) against the float
    model it came from: each quantized layer runs on the inputs the float model feeds its float twin."""
    from qcompile.nn import QuantizedLinear

    from qcompile.algorithms.calibrate import SCALING_ALGORITHMS

    plan = quantized_model.qcompile_plan
    modules = dict(quantized_model.named_modules())
    quantized = {name: m for name, m in modules.items() if isinstance(m, QuantizedLinear)}
    io = _capture_io(float_model, example_inputs, set(quantized))
    # AWQ / SmoothQuant folded a scale into the layer's producer: its input is the quantized model's own
    scaled = {e.site.name for e in plan.to_quantize() if e.algorithm in SCALING_ALGORITHMS}
    own_inputs = _capture_io(quantized_model, example_inputs, scaled & set(quantized)) if scaled else {}
    errors, packed = {}, {}
    for name, module in quantized.items():
        packed[name] = [t.detach() for t in module.packed()]
        if name in io:
            x, y = io[name]
            if name in own_inputs:
                x = own_inputs[name][0]  # the float output stays the float model's: upstream error included
            with torch.no_grad():
                y_hat = module(x.to(module.packed()[0].device)).to(y.dtype)
            errors[name] = float((y - y_hat).norm() / y.norm().clamp_min(1e-30))
    dtype = next((p.dtype for p in float_model.parameters() if p.dtype.is_floating_point), torch.float32)
    report = report_for_plan(plan, packed, device, dtype, errors)
    for row in report.rows:
        if row.site in own_inputs:
            row.note = "; ".join(filter(None, [row.note, "error includes the layers before (scaled input)"]))
    return report


def layer_report(model, recipe, example_inputs: list[dict], calibration=None, device="cpu") -> LayerReport:
    """Quantize a copy of the float ``model`` with ``recipe`` (and ``calibration``) and report every layer;
    ``example_inputs``: keyword inputs of the model (e.g. ``[{"input_ids": ids}]``) whose activations the error is
    measured on. ``model`` is left as it was."""
    import qcompile

    quantized = qcompile.quantize(copy.deepcopy(model), recipe, calibration=calibration, progress_bar=False)
    return report_for_quantized(model, quantized, example_inputs, device)
