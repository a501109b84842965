"""Calibrated quantization (GPTQ, AWQ, SmoothQuant) of a checkpoint one decoder block at a time.

The steps are those of :mod:`qcompile.algorithms.calibrate` (its block loop, through the same functions), on a
model that holds real tensors for one block at a time (sequential onloading):

1. the model is built on the meta device; the tensors outside its block list (embedding, final norm, head) become
   the checkpoint's memory-mapped tensors and its non-persistent buffers (rotary frequencies) are computed as
   ``from_pretrained`` computes them; the model runs on every calibration batch until the first block, whose
   inputs are kept (hidden states ``[B, S, hidden]``, position embeddings, mask); the outside tensors go back to
   meta and their pages are released;
2. for each block up to the last one holding a calibrated layer (the later ones feed no statistics: they are
   quantized a tensor at a time, with the same result): its tensors are read from the checkpoint into memory; it
   runs on the kept inputs with hooks on its planned layers (statistics); AWQ / SmoothQuant scales are folded;
   every planned layer is quantized, the block runs again with those weights to give the next block's inputs, and
   the float (scaled) weights come back; each planned layer is packed (GPTQ's result is the one just computed) and
   written, with the block's other tensors (norms as the scales left them); the block goes back to meta.

So the result is what ``qcompile.quantize(model, recipe, calibration=...)`` gives for the whole model, while peak
memory is one block's tensors, its layers' statistics (a ``[K, K]`` float64 Hessian per GPTQ layer) and the
activations of every calibration batch at one block boundary.

Calibrated layers outside the block list (a head) would need the float model's outputs: refused, naming them.
"""

from __future__ import annotations

import warnings

import torch

from qcompile.algorithms import get_algorithm
from qcompile.algorithms.calibrate import _block_inputs, _find_blocks, batches_and_statistics, calibrate_block
from qcompile.hf.memory import trim_heap
from qcompile.hf.streaming_source import SourceCheckpoint, tied_keys
from qcompile.plan import Plan
from qcompile.progress import progress
from qcompile.quantizer import quantize_entry


def calibrated_entries(plan: Plan) -> list:
    return [e for e in plan.to_quantize() if get_algorithm(e.algorithm).needs_calibration]


def _under(name: str, path: str | None) -> bool:
    return path is not None and (name == path or name.startswith(path + "."))


def _materialize(model, root, prefix: str, source: SourceCheckpoint, copy: bool, skip: str | None = None) -> list:
    """Give every tensor of ``root`` (the module at ``prefix``, ``""`` for the model) real storage: persistent ones
    from the checkpoint (copied into memory when ``copy``, else the memory-mapped views), non-persistent buffers
    as ``from_pretrained`` initializes them; modules under ``skip`` stay on meta. Returns the mapped views handed
    out (their pages are released by the caller)."""
    tied = tied_keys(model)
    given: dict[int, torch.Tensor] = {}
    views, computed = [], []

    def load(key: str) -> torch.Tensor:
        view = source.tensor(tied.get(key, key))
        if not copy:
            views.append(view)
            return view
        tensor = view.clone()
        source.release(view)
        return tensor

    for name, module in root.named_modules(remove_duplicate=False):
        if _under(f"{prefix}{name}", skip):
            continue
        base = f"{prefix}{name}." if name else prefix
        for local, param in list(module._parameters.items()):
            if param is not None:
                if id(param) not in given:
                    given[id(param)] = torch.nn.Parameter(load(base + local), requires_grad=False)
                module._parameters[local] = given[id(param)]
        for local, buffer in list(module._buffers.items()):
            if buffer is None:
                continue
            if local in module._non_persistent_buffers_set:
                module._buffers[local] = torch.empty_like(buffer, device="cpu")
                computed.append(module)
            else:
                module._buffers[local] = load(base + local)
    for module in dict.fromkeys(computed):  # rotary frequencies: computed from the config
        model._init_weights(module)
    return views


def _to_meta(root, skip: str | None = None, prefix: str = "") -> None:
    """Put every tensor of ``root`` back on the meta device (freeing its storage)."""
    for name, module in root.named_modules(remove_duplicate=False):
        if _under(f"{prefix}{name}", skip):
            continue
        for local, param in list(module._parameters.items()):
            if param is not None and param.device.type != "meta":
                module._parameters[local] = torch.nn.Parameter(param.to("meta"), requires_grad=False)
        for local, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device.type != "meta":
                module._buffers[local] = buffer.to("meta")


def _first_block_inputs(model, source, path: str, blocks, batches) -> list:
    views = _materialize(model, model, "", source, copy=False, skip=path)
    try:
        return _block_inputs(model, blocks[0], batches)
    finally:
        for view in views:
            source.release(view)
        _to_meta(model, skip=path)
        trim_heap()


def stream_blocks(model, source: SourceCheckpoint, plan: Plan, calibration, keys: set[str], write_float,
                  write_site, progress_bar: bool = True) -> tuple[set[str], list[str]]:  # fmt: skip
    """Quantize and write the tensors of ``model``'s decoder blocks up to the last one holding a calibrated layer
    (see the module docstring; the blocks after it feed no statistics, their tensors are left to the caller):
    planned layers through ``write_site(entry, packed)``, the blocks' other tensors that are in ``keys`` through
    ``write_float(key, tensor)``. Returns ``(checkpoint keys written, sites left unscaled and why)``."""
    entries = {e.site.name: e for e in plan.to_quantize()}
    calibrating = [e.site.name for e in calibrated_entries(plan)]
    explicit = [n for n in calibrating if dict(entries[n].options).get("explicit_scales")]
    if explicit:
        raise ValueError(f"{explicit[0]}: explicit_scales keeps input scales in qcompile's own modules; a streamed "
                         "checkpoint has no place for them. Drop the option")  # fmt: skip
    path, blocks = _find_blocks(model, calibrating)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no list of decoder blocks holding "
                         f"{', '.join(calibrating[:3])}: streaming calibrates block by block")  # fmt: skip
    outside = [n for n in calibrating if not _under(n, path)]
    if outside:
        algorithms = sorted({entries[n].algorithm for n in outside})
        raise ValueError(f"{', '.join(outside)}: {'/'.join(algorithms)} outside the decoder blocks ({path}.*) needs "
                         "the whole float model's activations, which streaming does not hold. Quantize them with "
                         "rtn or hqq (a recipe override), or load the model and call qcompile.quantize")  # fmt: skip
    last = max(i for i in range(len(blocks)) if any(n.startswith(f"{path}.{i}.") for n in calibrating))
    batches, stats = batches_and_statistics(model, plan, entries, calibrating, calibration)
    modules = dict(model.named_modules())
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False
    written, problems = set(), []
    try:
        with torch.no_grad():
            inputs = _first_block_inputs(model, source, path, blocks, batches)
            for i in progress(range(last + 1), "quantize", enabled=progress_bar, unit="block"):
                prefix = f"{path}.{i}."
                block = blocks[i]
                _materialize(model, block, prefix, source, copy=True)
                planned = [n for n in entries if n.startswith(prefix)]
                inputs, found = calibrate_block(block, prefix[:-1], inputs, modules, entries, stats, planned)
                problems += found
                weights = set()
                for name in planned:
                    entry = entries[name]
                    write_site(entry, quantize_entry(entry, modules[name].weight, stats.pop(name, None)))
                    weights.add(entry.site.weight_name)
                for key, tensor in block.state_dict(prefix=prefix).items():
                    if key in keys and key not in weights:
                        write_float(key, tensor)
                        written.add(key)
                written |= weights
                _to_meta(block, prefix=prefix)
                trim_heap()
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
    if problems:
        warnings.warn("calibration: these sites keep unscaled weights (plain round to nearest):\n  "
                      + "\n  ".join(problems), stacklevel=3)  # fmt: skip
    return written, problems
