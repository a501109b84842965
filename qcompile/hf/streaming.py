"""Quantize a Hugging Face checkpoint larger than memory: read it a tensor (or a decoder block) at a time, write the
quantized checkpoint as it goes.

    from qcompile.hf.streaming import quantize_checkpoint
    report = quantize_checkpoint("Llama-3-70B/", "llama-int4/", "int4-g128")    # loads with from_pretrained
    report = quantize_checkpoint(src, out, {"default": "int4-g128", "algorithm": "gptq"}, calibration=ids,
                                 format="compressed-tensors")                    # vLLM, SGLang

1. The model config.json describes is built on the meta device (no tensor allocated); its linear layers, with
   the shapes and dtypes of the checkpoint's safetensors headers, are planned with the recipe
   (:func:`qcompile.plan.make_plan`), exactly as the transformers plug-in plans them.
2. Round to nearest and HQQ (no calibration): each checkpoint tensor is read memory-mapped, quantized with
   :func:`qcompile.quantizer.quantize_entry` when the plan names it (else copied as stored), written, and its pages
   released, one at a time. GPTQ, AWQ, SmoothQuant: the decoder blocks go one by one
   (:mod:`qcompile.hf.streaming_blocks`); the tensors outside them, one at a time.
3. Output shards are written as tensors come (:mod:`qcompile.hf.streaming_writer`), never the whole output in
   memory; config.json (with the quantization config of the chosen format), and the source's tokenizer, generation
   config and other non-weight files are written next to them.

Peak memory: the process's own (torch, transformers), plus one float tensor and its quantization's temporaries
(round to nearest), or one decoder block plus its statistics and the calibration activations (calibrated).

The output equals what the in-memory paths write for the same checkpoint and recipe, tensor for tensor: ``"hf"``
what ``from_pretrained(src, quantization_config=QCompileConfig(recipe))`` then ``save_pretrained`` writes
(``qcompile.quantize`` with calibration for calibrated recipes), ``"compressed-tensors"`` what
:func:`qcompile.hf.compressed_tensors_export.save` writes for the model ``qcompile.quantize`` quantized. The
checkpoint's tensor names must be the model's (checkpoints that transformers renames while loading are refused);
float tensors keep the dtype the checkpoint stores them in.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import time

import torch

from qcompile.hf.memory import trim_heap
from qcompile.hf.streaming_blocks import calibrated_entries, stream_blocks
from qcompile.hf.streaming_formats import FORMATS, make_output
from qcompile.hf.streaming_source import SourceCheckpoint, meta_model, output_keys, plan_sites, tied_keys
from qcompile.hf.streaming_writer import ShardWriter
from qcompile.plan import Plan, make_plan
from qcompile.progress import progress as reported
from qcompile.quantizer import quantize_entry

DEFAULT_SHARD_BYTES = 5 << 30
#: files of the source directory that are not copied: weights (written anew) and config.json (rewritten)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".qpt")


@dataclasses.dataclass
class StreamReport:
    """What :func:`quantize_checkpoint` did. ``peak_rss``: the process's peak resident set (``VmHWM``, bytes; 0
    where ``/proc`` has none) when it returned; ``dropped``: checkpoint tensors the model does not hold (not
    written, as ``from_pretrained`` would not load them); ``records``: one
    :class:`~qcompile.hf.compressed_tensors_export.ExportRecord` per layer (compressed-tensors); ``unscaled``:
    layers AWQ / SmoothQuant left unscaled, and why."""

    source: str
    output: str
    format: str
    plan: Plan
    files: list[str]
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss: int
    dropped: list[str] = dataclasses.field(default_factory=list)
    records: list = dataclasses.field(default_factory=list)
    unscaled: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        from qcompile.report import human_bytes

        shards = f"{len(self.files)} shard{'s' * (len(self.files) > 1)}"
        return (f"{self.source} → {self.output} ({self.format}): {len(self.plan.to_quantize())} layers quantized, "
                f"read {human_bytes(self.bytes_read)}, wrote {human_bytes(self.bytes_written)} in {shards}, "
                f"{self.seconds:.1f} s, peak RSS {human_bytes(self.peak_rss)}")  # fmt: skip


def peak_rss() -> int:
    """``VmHWM`` of this process in bytes (0 where ``/proc/self/status`` does not exist)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def quantize_checkpoint(src_dir, out, recipe, format: str = "hf", calibration=None,
                        max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True) -> StreamReport:
    """Quantize the safetensors checkpoint in ``src_dir`` with ``recipe`` into the directory ``out`` as ``format``
    (``"hf"``: loads with ``from_pretrained`` and ``import qcompile``; ``"compressed-tensors"``: loads in vLLM,
    SGLang and transformers), reading one tensor or decoder block at a time (see the module docstring).

    ``recipe``: anything :func:`qcompile.recipe.load_recipe` takes. ``calibration``: token ids (or a tokenizer,
    or ``None`` for the built-in text with the checkpoint's tokenizer) for recipes using GPTQ, AWQ or SmoothQuant,
    as :func:`qcompile.quantize` takes it; refused for recipes that read none. ``max_shard_bytes``: the most tensor
    bytes per output shard. Returns a :class:`StreamReport`."""
    start = time.perf_counter()
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    source = SourceCheckpoint(src_dir)
    out_dir = pathlib.Path(out)
    if out_dir.exists() and out_dir.resolve() == source.directory.resolve():
        raise ValueError(f"{out}: the output directory is the source checkpoint's; write elsewhere")
    try:
        model = meta_model(source.directory)
        keys, dropped = output_keys(model, source)
        sites, kept = plan_sites(model, source)
        plan = make_plan(recipe, sites, kept=kept)
        _check_plan(model, plan, calibration)
        output = make_output(format, plan, recipe)
        files, read, unscaled = _write_shards(model, source, plan, keys, output, calibration,
                                              ShardWriter(out_dir, max_shard_bytes), progress)  # fmt: skip
    finally:
        source.close()
    output.write_config(source.directory, out_dir)
    _copy_side_files(source.directory, out_dir)
    return StreamReport(str(source.directory), str(out_dir), format, plan, [str(f) for f in files], read,
                        sum(os.path.getsize(f) for f in files), time.perf_counter() - start, peak_rss(), dropped,
                        output.records, unscaled)  # fmt: skip


def _write_shards(model, source, plan, keys, output, calibration, writer, progress_bar):
    """Every output tensor through ``writer``: the decoder blocks of a calibrated recipe block by block, then the
    rest a tensor at a time. Returns ``(shard paths, bytes read, unscaled layers)``."""

    def write_site(entry, packed):
        for key, tensor in output.site_tensors(entry, packed).items():
            writer.add(key, tensor)

    try:
        written, unscaled = set(), []
        if calibrated_entries(plan):
            written, unscaled = stream_blocks(model, source, plan, calibration, set(keys), writer.add, write_site,
                                              progress_bar)  # fmt: skip
        read = sum(source.tensors[key].nbytes for key in written)
        rest = [key for key in keys if key not in written]
        read += _stream_tensors(source, plan, rest, writer.add, write_site, progress_bar)
        return writer.close(), read, unscaled
    except BaseException:
        writer.abort()
        raise


def _check_plan(model, plan: Plan, calibration) -> None:
    tied = tied_keys(model)
    tied_names = set(tied) | set(tied.values())
    for entry in plan.to_quantize():
        if entry.site.weight_name in tied_names or entry.site.tied_to:
            raise ValueError(f"the recipe quantizes {entry.site.name}, whose weight is tied to another (the input "
                             "embedding); tied weights cannot be streamed quantized. Keep it float")  # fmt: skip
    calibrated = sorted({e.algorithm for e in calibrated_entries(plan)})
    if not calibrated and calibration is not None:
        algorithms = sorted({e.algorithm for e in plan.to_quantize()})
        raise ValueError(f"calibration= is only read by gptq, awq and smoothquant; this recipe runs "
                         f"{', '.join(algorithms) or 'no algorithm'}. Drop calibration=")  # fmt: skip


def _stream_tensors(source: SourceCheckpoint, plan: Plan, keys: list[str], write_float, write_site,
                    progress_bar: bool) -> int:  # fmt: skip
    """Tensor at a time: quantize the planned weights among ``keys`` (checkpoint order), copy the others; each
    tensor's mapped pages are released once it is written. Returns the bytes read."""
    planned = {e.site.weight_name: e for e in plan.to_quantize()}
    read = 0
    for key in reported(keys, "quantize", enabled=progress_bar, unit="tensor"):
        tensor = source.tensor(key)
        entry = planned.get(key)
        if entry is None:
            write_float(key, tensor, source.release)  # pages released piece by piece while written
            source.release(tensor)
        else:  # quantize_entry works in float32: convert first, so the file pages go before it starts
            weight = tensor.to(torch.float32, copy=True)
            source.release(tensor)
            write_site(entry, quantize_entry(entry, weight))
            del weight
            trim_heap()
        read += source.tensors[key].nbytes
        del tensor
    return read


def _copy_side_files(source: pathlib.Path, out: pathlib.Path) -> None:
    """Tokenizer, generation config, chat template, README ...: every plain file but weights and config.json."""
    for path in sorted(source.iterdir()):
        if (not path.is_file() or path.name.startswith(".") or path.name == "config.json"
                or path.suffix in _WEIGHT_SUFFIXES or path.name.endswith(".index.json")):  # fmt: skip
            continue
        shutil.copy2(path, out / path.name)
