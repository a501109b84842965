"""The output forms of a streamed quantization: the tensors written for each quantized layer, and config.json.

* ``"hf"`` (:class:`HfOutput`): what ``save_pretrained`` writes for a model the transformers plug-in quantized
  while loading: each layer's packed tensors under its module path (``<site>.qweight``, ``<site>.scales``, ... as
  the scheme declares them), and config.json with ``quantization_config`` = ``QCompileConfig(recipe)`` and its
  ``plan`` (:func:`qcompile.hf.modules.plan_data`). ``from_pretrained`` loads it with ``import qcompile``;
* ``"compressed-tensors"`` (:class:`CompressedTensorsOutput`): what
  :func:`qcompile.hf.compressed_tensors_export.save` writes, layer by layer through its ``export_site``. Layers with
  no compressed-tensors form are refused, all of them named, before any weight is read.

Float tensors (embeddings, norms, biases, float layers) are written as the checkpoint stores them by the caller.
"""

from __future__ import annotations

import dataclasses

import torch

from qcompile.plan import Plan, PlanEntry
from qcompile.schemes import PackedWeight

FORMATS = ("hf", "compressed-tensors")


class HfOutput:
    """``format="hf"`` (see the module docstring)."""

    name = "hf"

    def __init__(self, plan: Plan, recipe):
        from qcompile.hf.config import QCompileConfig
        from qcompile.hf.modules import plan_data

        self.quantization_config = QCompileConfig(recipe=recipe)
        self.quantization_config.plan = plan_data(plan)
        self.records: list = []

    def site_tensors(self, entry: PlanEntry, packed: PackedWeight) -> dict[str, torch.Tensor]:
        return {f"{entry.site.name}.{name}": tensor for name, tensor in packed.tensors().items()}

    def write_config(self, source_dir, out_dir) -> None:
        import transformers

        config = transformers.AutoConfig.from_pretrained(source_dir)
        config.quantization_config = self.quantization_config
        config.save_pretrained(out_dir)


class CompressedTensorsOutput:
    """``format="compressed-tensors"`` (see the module docstring)."""

    name = "compressed-tensors"

    def __init__(self, plan: Plan, recipe=None):
        from qcompile.hf.compressed_tensors_export import ExportError, refusal

        refused = [f"{e.site.name} ({e.scheme}): {reason}" for e in plan.quantized()
                   if (reason := refusal(e.parsed, e.site.in_features)) is not None]  # fmt: skip
        if refused:
            raise ExportError("these sites have no compressed-tensors form:\n  " + "\n  ".join(refused))
        self.plan = plan
        self._sites: dict[str, object] = {}  # site name → its export record, weights and activations (no tensors)

    def site_tensors(self, entry: PlanEntry, packed: PackedWeight) -> dict[str, torch.Tensor]:
        from qcompile.hf.compressed_tensors_export import export_site
        from qcompile.nn import QuantizedLinear

        site = entry.site
        module = QuantizedLinear(site.in_features, site.out_features, entry.scheme, packed)
        exported = export_site(site.name, module)
        self._sites[site.name] = dataclasses.replace(exported, tensors={})
        return {f"{site.name}.{key}": tensor.contiguous() for key, tensor in exported.tensors.items()}

    @property
    def records(self) -> list:
        return [self._sites[e.site.name].record for e in self.plan.quantized() if e.site.name in self._sites]

    def write_config(self, source_dir, out_dir) -> None:
        import transformers

        from qcompile.hf.compressed_tensors_export import write_config

        sites = [self._sites[e.site.name] for e in self.plan.quantized()]  # the model's order, as save() has it
        ignore = [e.site.name for e in self.plan if e.scheme is None and e.site.kind == "linear"]
        write_config(out_dir, transformers.AutoConfig.from_pretrained(source_dir).to_dict(), sites, ignore)


def make_output(format: str, plan: Plan, recipe):
    if format == "hf":
        return HfOutput(plan, recipe)
    if format == "compressed-tensors":
        return CompressedTensorsOutput(plan, recipe)
    raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
