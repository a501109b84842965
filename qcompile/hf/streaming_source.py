"""The float Hugging Face checkpoint a streaming quantization reads, and the model it describes, on the meta device.

* :class:`SourceCheckpoint`: the safetensors shards of a directory (``model.safetensors``, the shards
  ``model.safetensors.index.json`` lists, else every ``*.safetensors``); each tensor's file, dtype, shape and offset
  come from the headers (nothing else is read up front). :meth:`SourceCheckpoint.tensor` gives one tensor as a view
  of its memory-mapped file (``safetensors.safe_open``; one file open at a time), and
  :meth:`SourceCheckpoint.release` drops that tensor's pages from the process once it is consumed.
* :func:`meta_model`: the model config.json describes, built on the meta device (``AutoModelForCausalLM``, else
  ``AutoModel``; no remote code): module names, linear layers and tied weights, no tensor allocated.
* :func:`plan_sites`: the planning sites: the meta model's linear layers, with the shape and dtype the checkpoint
  header gives for each weight (checked against the model's).
* :func:`output_keys`: which checkpoint tensors the output holds (the model's, each tied weight once), and which it
  leaves out because the model has no such tensor.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import pathlib
import struct

import torch

from qcompile.hf.headers import _DTYPES
from qcompile.hf.memory import release_file_pages
from qcompile.plan import Site

_MAX_HEADER = 100 << 20
_OPEN_FILES = 1  # a shard stays mapped while a tensor of it is alive; address space: one shard at a time


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One checkpoint tensor as its header describes it: ``dtype`` is the safetensors code (``BF16``)."""

    key: str
    file: pathlib.Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return getattr(torch, _DTYPES.get(self.dtype, ""), None)

    def describe(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


def _read_header(path: pathlib.Path) -> list[TensorInfo]:
    """The tensors of one safetensors file, in the order of their bytes in it."""
    with open(path, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < size <= _MAX_HEADER:
            raise ValueError(f"{path}: not a safetensors file (header length {size})")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: the safetensors header is not JSON ({error})") from None
    out = []
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        out.append(TensorInfo(key, path, meta["dtype"], tuple(meta["shape"]), 8 + size + begin, end - begin))
    return sorted(out, key=lambda info: info.offset)


def _shard_files(directory: pathlib.Path) -> list[pathlib.Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists {', '.join(missing)}, which {directory} does not hold")
        return files
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    files = sorted(p for p in directory.glob("*.safetensors") if not p.name.startswith("."))
    if files:
        return files
    others = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
    hint = (f" (it holds {', '.join(others[:3])}: load it with transformers and save_pretrained it to get "
            "safetensors)" if others else "")  # fmt: skip
    raise FileNotFoundError(f"{directory}: no safetensors weights{hint}")


class SourceCheckpoint:
    """The safetensors tensors of a Hugging Face checkpoint directory (see the module docstring)."""

    def __init__(self, directory):
        self.directory = pathlib.Path(directory)
        if not (self.directory / "config.json").is_file():
            raise FileNotFoundError(f"{self.directory}: no config.json (not a Hugging Face checkpoint directory)")
        self.files = _shard_files(self.directory)
        self.tensors: dict[str, TensorInfo] = {}  # file by file, in the order of their bytes
        for path in self.files:
            for info in _read_header(path):
                if info.key in self.tensors:
                    raise ValueError(f"{self.directory}: {info.key} is in both {self.tensors[info.key].file.name} "
                                     f"and {path.name}")  # fmt: skip
                self.tensors[info.key] = info
        self._handles: collections.OrderedDict = collections.OrderedDict()

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def _handle(self, path: pathlib.Path):
        from safetensors import safe_open

        handle = self._handles.pop(path, None)
        if handle is None:
            handle = safe_open(str(path), framework="pt")
            while len(self._handles) >= _OPEN_FILES:
                _, oldest = self._handles.popitem(last=False)
                oldest.__exit__(None, None, None)
        self._handles[path] = handle
        return handle

    def tensor(self, key: str) -> torch.Tensor:
        """Tensor ``key``, a view of its memory-mapped file (copy-on-write: writing to it copies the pages)."""
        info = self.tensors.get(key)
        if info is None:
            raise KeyError(f"{self.directory}: the checkpoint has no tensor {key}")
        if info.torch_dtype is None:
            raise ValueError(f"{info.file.name}: {key} is {info.describe()}, a dtype torch cannot hold")
        return self._handle(info.file).get_tensor(key)

    @staticmethod
    def release(tensor: torch.Tensor) -> int:
        """Drop the pages of a tensor :meth:`tensor` gave from this process; returns the bytes released."""
        return release_file_pages(tensor)

    def close(self) -> None:
        while self._handles:
            self._handles.popitem()[1].__exit__(None, None, None)


def meta_model(directory):
    """The model ``directory/config.json`` describes, on the meta device, in eval mode."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    errors = []
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            with torch.device("meta"):
                return auto.from_config(copy.deepcopy(config)).eval()
        except ValueError as error:  # no mapping for this config class
            errors.append(str(error).splitlines()[0])
    raise ValueError(f"{directory}: transformers builds no model for model_type {config.model_type!r}: "
                     + "; ".join(errors))  # fmt: skip


def tied_keys(model) -> dict[str, str]:
    """``{tied parameter: the parameter it is tied to}`` (``lm_head.weight`` → ``model.embed_tokens.weight``)."""
    return dict(getattr(model, "all_tied_weights_keys", None) or {})


def plan_sites(model, source: SourceCheckpoint) -> tuple[list[Site], list[tuple[Site, str]]]:
    """``(linear sites, kept layers)`` for :func:`qcompile.plan.make_plan`: each linear layer of the meta
    ``model``, with the dtype and bytes of its weight in the checkpoint (a tied weight's tensor is the one it is
    tied to). A weight the checkpoint lacks, or holds in another shape, raises naming both."""
    from qcompile.eager import kept_sites, linear_sites

    tied = tied_keys(model)
    sites = []
    for site, module in linear_sites(model):
        key = tied.get(site.weight_name, site.weight_name)
        info = source.tensors.get(key)
        expected = tuple(module.weight.shape)
        if info is None:
            raise ValueError(f"{source.directory}: the checkpoint has no tensor {key}, the weight of "
                             f"{type(model).__name__}'s linear layer {site.name} ({list(expected)})")  # fmt: skip
        if info.shape != expected:
            raise ValueError(f"{info.file.name}: {key} is {info.describe()}, {type(model).__name__}'s layer "
                             f"{site.name} expects {list(expected)}")  # fmt: skip
        dtype = info.torch_dtype
        sites.append(dataclasses.replace(site, weight_dtype=str(dtype).removeprefix("torch.") if dtype else info.dtype,
                                         weight_bytes=info.nbytes))  # fmt: skip
    return sites, kept_sites(model)


def output_keys(model, source: SourceCheckpoint) -> tuple[list[str], list[str]]:
    """``(kept, dropped)``: the checkpoint keys the output holds (the model's persistent tensors, a tied weight
    once, under the name it is tied to), and those it drops (no such tensor in the model, or a tied copy), as
    ``from_pretrained`` then ``save_pretrained`` would. A model tensor the checkpoint lacks raises."""
    tied = tied_keys(model)
    wanted = [key for key in model.state_dict() if key not in tied]
    missing = [key for key in wanted if key not in source.tensors]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{source.directory}: the checkpoint lacks {', '.join(missing[:5])}{more}, which "
                         f"{type(model).__name__} holds (checkpoints whose tensor names transformers converts "
                         "while loading cannot be streamed; load and save_pretrained them first)")  # fmt: skip
    wanted_set = set(wanted)
    kept = [key for key in source.tensors if key in wanted_set]
    dropped = [key for key in source.tensors if key not in wanted_set]
    return kept, dropped
