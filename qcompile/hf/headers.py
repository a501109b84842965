"""Check a qcompile checkpoint's packed tensors against the schemes' declarations before anything is loaded.

Shapes and dtypes come from the safetensors headers (``.bin`` files are read onto the meta device), so a forged or
truncated checkpoint fails naming the site, the tensor, what the scheme declares and what the file holds — instead
of being cast, or reinitialized under ``ignore_mismatched_sizes``.
"""

from __future__ import annotations

import os

import torch

from qcompile.plan import Plan

#: safetensors dtype strings → torch dtypes (a name torch lacks is reported as it is written)
_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
}  # fmt: skip


def _meta_tensors(path: str) -> dict[str, torch.Tensor | str]:
    """``{key: meta tensor}`` of one checkpoint file (a dtype torch cannot hold stays its header string)."""
    out: dict[str, torch.Tensor | str] = {}
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                view = handle.get_slice(key)
                dtype = getattr(torch, _DTYPES.get(view.get_dtype(), ""), None)
                shape = tuple(view.get_shape())
                out[key] = (torch.empty(shape, dtype=dtype, device="meta") if isinstance(dtype, torch.dtype)
                            else f"{view.get_dtype()}{list(shape)}")  # fmt: skip
        return out
    state = torch.load(path, map_location="meta", weights_only=True)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def check_checkpoint(plan: Plan, files: list[str]) -> None:
    """Raise ``ValueError`` when a quantized site's tensors are missing from ``files`` or disagree with its
    scheme's declaration (shape, dtype)."""
    found: dict[str, torch.Tensor | str] = {}
    where: dict[str, str] = {}
    for path in files:
        tensors = _meta_tensors(os.fspath(path))
        found.update(tensors)
        where.update(dict.fromkeys(tensors, os.path.basename(path)))
    for entry in plan.quantized():
        site, scheme = entry.site, entry.parsed
        specs = scheme.tensors(site.out_features, site.in_features)
        tensors = []
        for spec in specs:
            key = f"{site.name}.{spec.name}"
            tensor = found.get(key)
            if tensor is None:
                raise ValueError(f"checkpoint: {key} is missing; {site.name} is {scheme.name}, which stores "
                                 f"{', '.join(s.name for s in specs)}")  # fmt: skip
            if isinstance(tensor, str):
                raise ValueError(f"checkpoint {where[key]}: {key} is {tensor}, expected {spec.describe()} "
                                 f"({scheme.name})")  # fmt: skip
            tensors.append(tensor)
        scheme.check_packed(tensors, site.out_features, site.in_features,
                            where=f"checkpoint {where[f'{site.name}.{specs[0].name}']}: {site.name}")  # fmt: skip

