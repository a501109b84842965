"""bitsandbytes serialized 4-bit checkpoints (``load_in_4bit``) → qcompile ``nf4-g<B>`` / ``bnb-fp4-g<B>``.

Per linear layer ``<m>`` (``W [N, K]``, blocksize ``B``, ``n_blocks = ceil(N K / B)``)::

    <m>.weight                                  uint8  [(N K + 1) // 2, 1]  W flattened row-major: element 2i in
                                                                            the HIGH nibble of byte i, 2i+1 the low
    <m>.weight.absmax                           float32 [n_blocks]          (uint8 with double quantization)
    <m>.weight.quant_map                        float32 [16]                the 4-bit table
    <m>.weight.nested_absmax                    float32 [ceil(n_blocks / 256)]   double quantization only
    <m>.weight.nested_quant_map                 float32 [256]                    double quantization only
    <m>.weight.quant_state.bitsandbytes__nf4    uint8 [L]  UTF-8 JSON {quant_type, blocksize, dtype, shape,
                                                           nested_blocksize, nested_dtype, nested_offset} (or __fp4)
    <m>.bias                                    optional

    w = table[code] * absmax[flat_index // B]
    double quantization:  absmax[b] = float32(nested_quant_map[absmax_u8[b]] * nested_absmax[b // 256]) + nested_offset

Blocks run over the flattened weight, so they follow rows only when ``K % B == 0``: then block ``b`` is row
``b // (K/B)``, group ``b % (K/B)``, and ``nf4-g<B>`` (or ``bnb-fp4-g<B>``) holds the same codes (re-laid: element
2j in the low nibble) and, as ``scales``, the absmax exactly as bitsandbytes computes it in float32 (product, then
the offset added). ``K % B != 0`` is refused by name. The stored ``quant_map`` must equal the table of the quant
type (bitsandbytes' ``dequantize_4bit`` uses its built-in table, not the stored one); a differing table is refused.
8-bit (``load_in_8bit``) checkpoints and non-uint8 ``bnb_4bit_quant_storage`` are refused by name.
"""

from __future__ import annotations

import json

import torch

from qcompile.hf.checkpoints.common import CheckpointError, ImportedLinear, expect
from qcompile.schemes import parse_scheme
from qcompile.schemes.base import QuantizedWeight
from qcompile.schemes.bnb_fp4 import BNB_FP4_LEVELS
from qcompile.schemes.nf4 import NF4_LEVELS

METHOD = "bitsandbytes"
TABLES = {"nf4": NF4_LEVELS, "fp4": BNB_FP4_LEVELS}
SCHEMES = {"nf4": "nf4-g{}", "fp4": "bnb-fp4-g{}"}
SUFFIXES = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
            "weight.quant_state.bitsandbytes__nf4", "weight.quant_state.bitsandbytes__fp4", "bias")  # fmt: skip


def check_config(config: dict) -> None:
    if config.get("load_in_8bit") and not config.get("load_in_4bit"):
        raise CheckpointError("bitsandbytes 8-bit (load_in_8bit) checkpoints are not supported; only 4-bit")


def layers(names, config: dict, modules: dict | None = None) -> dict[str, tuple[dict, dict[str, str]]]:
    """``{layer: (config, {local tensor name: checkpoint name})}`` for every layer with a packed 4-bit quant
    state."""
    check_config(config)
    names = set(names)
    out = {}
    for name in sorted(names):
        for quant_type in TABLES:
            suffix = f".weight.quant_state.bitsandbytes__{quant_type}"
            if name.endswith(suffix):
                layer = name.removesuffix(suffix)
                out[layer] = (config, {s: f"{layer}.{s}" for s in SUFFIXES if f"{layer}.{s}" in names})
    return out


def read_quant_state(blob: torch.Tensor, where: str) -> dict:
    try:
        return json.loads(bytes(blob.to(torch.uint8).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{where}.weight.quant_state: not UTF-8 JSON ({error})") from None


def absmax_of(tensors: dict[str, torch.Tensor], state: dict, n_blocks: int, where: str) -> torch.Tensor:
    """float32 ``[n_blocks]`` block absmax, double quantization undone as bitsandbytes does it."""
    absmax = tensors.get("weight.absmax")
    if "nested_absmax" not in state and "weight.nested_absmax" not in tensors:
        return expect(absmax, where, "weight.absmax", (n_blocks,), torch.float32, "no double quantization")
    nested_block = int(state.get("nested_blocksize", 256))
    codes = expect(absmax, where, "weight.absmax", (n_blocks,), torch.uint8, "double quantization: 8-bit codes")
    nested = expect(tensors.get("weight.nested_absmax"), where, "weight.nested_absmax",
                    (-(-n_blocks // nested_block),), torch.float32, f"nested_blocksize={nested_block}")  # fmt: skip
    table = expect(tensors.get("weight.nested_quant_map"), where, "weight.nested_quant_map", (256,), torch.float32)
    if "nested_offset" not in state:
        raise CheckpointError(f"{where}.weight.quant_state: double quantization without nested_offset")
    offset = torch.tensor(float(state["nested_offset"]), dtype=torch.float32)
    scaled = table[codes.long()] * nested.repeat_interleave(nested_block)[:n_blocks]
    return scaled + offset


def convert(tensors: dict[str, torch.Tensor], config: dict, *, in_features: int | None = None,
            out_features: int | None = None, where: str = "layer") -> ImportedLinear:  # fmt: skip
    """One 4-bit layer (local names ``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_*``,
    ``weight.quant_state.bitsandbytes__<type>``, ``bias``) → :class:`ImportedLinear`."""
    check_config(config)
    blobs = [(t, tensors[f"weight.quant_state.bitsandbytes__{t}"]) for t in TABLES
             if f"weight.quant_state.bitsandbytes__{t}" in tensors]  # fmt: skip
    if len(blobs) != 1:
        raise CheckpointError(f"{where}: expected one weight.quant_state.bitsandbytes__nf4 or __fp4 tensor, found "
                              f"{len(blobs)}")  # fmt: skip
    key_type, blob = blobs[0]
    state = read_quant_state(blob, where)
    quant_type = state.get("quant_type", key_type)
    if quant_type != key_type or quant_type not in TABLES:
        raise CheckpointError(f"{where}.weight.quant_state: quant_type {quant_type!r} (key says {key_type!r})")
    shape = state.get("shape")
    if shape is None or len(shape) != 2:
        raise CheckpointError(f"{where}.weight.quant_state: shape {shape!r} is not [N, K]")
    n, k = int(shape[0]), int(shape[1])
    if (in_features is not None and k != in_features) or (out_features is not None and n != out_features):
        raise CheckpointError(f"{where}.weight.quant_state: shape [{n}, {k}], the model's layer is "
                              f"[{out_features}, {in_features}]")  # fmt: skip
    block = int(state.get("blocksize", 64))
    if k % block:
        raise CheckpointError(f"{where}: K={k} is not a multiple of the blocksize {block}: bitsandbytes blocks run "
                              f"over the flattened weight and would straddle rows (not supported)")  # fmt: skip
    weight = tensors.get("weight")
    if weight is not None and weight.dtype != torch.uint8:
        raise CheckpointError(f"{where}.weight: is {weight.dtype} (bnb_4bit_quant_storage); only uint8 storage is "
                              f"read")  # fmt: skip
    expect(weight, where, "weight", ((n * k + 1) // 2, 1), torch.uint8, f"4-bit codes of [{n}, {k}]")
    table = torch.tensor(TABLES[quant_type], dtype=torch.float32)
    quant_map = expect(tensors.get("weight.quant_map"), where, "weight.quant_map", (16,), torch.float32)
    if not torch.equal(quant_map, table):
        levels = [round(v, 5) for v in table.tolist()]
        raise CheckpointError(f"{where}.weight.quant_map: differs from the {quant_type} table {levels}; a custom "
                              f"4-bit table is not supported")  # fmt: skip
    n_blocks = n * k // block
    absmax = absmax_of(tensors, state, n_blocks, where)
    packed_bytes = weight.reshape(-1)
    codes = torch.stack([packed_bytes >> 4, packed_bytes & 0xF], dim=-1).reshape(n, k)
    scheme = parse_scheme(SCHEMES[quant_type].format(block))
    q = QuantizedWeight(codes.contiguous(), absmax.reshape(n, k // block).contiguous(), None, k)
    bias = tensors.get("bias")
    if bias is not None:
        expect(bias, where, "bias", (n,), (torch.float16, torch.bfloat16, torch.float32))
    return ImportedLinear(scheme.name, scheme.pack(q), k, n, None, bias)
