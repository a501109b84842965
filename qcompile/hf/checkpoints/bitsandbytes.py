"""bitsandbytes serialized checkpoints → qcompile, bytes kept: 4-bit (``load_in_4bit``) → ``bnb4``
(``bnb-nf4``, ``bnb-fp4``, ``-dq``, ``-b<B>``), 8-bit (``load_in_8bit``) → ``llm-int8`` (``-t<threshold>``).

4-bit, per linear layer ``<m>`` (``W [N, K]``, blocksize ``B``, ``n_blocks = ceil(N K / B)``)::

    <m>.weight                                  uint8  [(N K + 1) // 2, 1]  W flattened row-major: element 2i in
                                                                            the HIGH nibble of byte i, 2i+1 the low
    <m>.weight.absmax                           float32 [n_blocks]          (uint8 with double quantization)
    <m>.weight.quant_map                        float32 [16]                the 4-bit table
    <m>.weight.nested_absmax                    float32 [ceil(n_blocks / 256)]   double quantization only
    <m>.weight.nested_quant_map                 float32 [256]                    double quantization only
    <m>.weight.quant_state.bitsandbytes__nf4    uint8 [L]  UTF-8 JSON {quant_type, blocksize, dtype, shape,
                                                           nested_blocksize, nested_dtype, nested_offset} (or __fp4)
    <m>.bias                                    optional

These are ``bnb4``'s packed tensors as they are (:mod:`qcompile.schemes.bnb4`): ``qweight`` is ``weight``'s bytes
(viewed as uint8 whatever ``bnb_4bit_quant_storage`` typed them as), ``absmax`` and ``nested_absmax`` are the
tensors, ``nested_offset`` the JSON's float (a float32 written out exactly). Blocks run over the flattened weight,
so any ``K`` loads. The stored ``quant_map`` must be the quant type's table and ``nested_quant_map`` the 8-bit
dynamic map with ``nested_blocksize`` 256 (bitsandbytes decodes the nested absmax with the stored map): others are
refused by name.

8-bit, per linear layer: ``<m>.weight`` int8 ``[N, K]`` (CB), ``<m>.SCB`` float32 ``[N]``, ``<m>.weight_format``
(uint8 0: row-major, the only layout read), ``<m>.bias``; ``quantization_config.llm_int8_threshold`` (default 6.0)
picks ``llm-int8-t<threshold>``. A threshold <= 0 (no outlier columns) and ``llm_int8_has_fp16_weight`` are
refused by name.
"""

from __future__ import annotations

import json

import torch

from qcompile.hf.checkpoints.common import CheckpointError, ImportedLinear, expect
from qcompile.schemes import PackedWeight
from qcompile.schemes import bnb_blockwise as blockwise
from qcompile.schemes.bnb4 import BLOCKSIZES, NESTED_BLOCKSIZE, Bnb4
from qcompile.schemes.llm_int8 import DEFAULT_THRESHOLD, Int8Rows, LLMInt8

METHOD = "bitsandbytes"
QUANT_TYPES = tuple(blockwise.TABLES)
SUFFIXES_4BIT = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
                 "weight.quant_state.bitsandbytes__nf4", "weight.quant_state.bitsandbytes__fp4", "bias")  # fmt: skip
SUFFIXES_8BIT = ("weight", "SCB", "weight_format", "bias")
BIAS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_config(config: dict) -> None:
    if config.get("load_in_8bit") and config.get("llm_int8_has_fp16_weight"):
        raise CheckpointError("bitsandbytes 8-bit: llm_int8_has_fp16_weight=True checkpoints hold float weights that "
                              "bitsandbytes quantizes while running; load them as a float model")  # fmt: skip


def layers(names, config: dict, modules: dict | None = None) -> dict[str, tuple[dict, dict[str, str]]]:
    """``{layer: (config, {local tensor name: checkpoint name})}`` for every layer with a packed 4-bit quant state
    or an 8-bit ``SCB``."""
    check_config(config)
    names = set(names)
    out = {}
    for name in sorted(names):
        layer, suffixes = None, ()
        for quant_type in QUANT_TYPES:
            if name.endswith(f".weight.quant_state.bitsandbytes__{quant_type}"):
                layer, suffixes = name.removesuffix(f".weight.quant_state.bitsandbytes__{quant_type}"), SUFFIXES_4BIT
        if name.endswith(".SCB"):
            layer, suffixes = name.removesuffix(".SCB"), SUFFIXES_8BIT
        if layer is not None:
            out[layer] = (config, {s: f"{layer}.{s}" for s in suffixes if f"{layer}.{s}" in names})
    return out


def read_quant_state(blob: torch.Tensor, where: str) -> dict:
    try:
        return json.loads(bytes(blob.to(torch.uint8).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{where}.weight.quant_state: not UTF-8 JSON ({error})") from None


def _table(tensors, where: str, name: str, expected: torch.Tensor, what: str) -> None:
    stored = expect(tensors.get(name), where, name, tuple(expected.shape), torch.float32)
    if not torch.equal(stored, expected):
        raise CheckpointError(f"{where}.{name}: differs from {what}; a custom table is not supported")


def _bias(tensors, where: str, n: int):
    bias = tensors.get("bias")
    if bias is not None:
        expect(bias, where, "bias", (n,), BIAS_DTYPES)
    return bias


def _shape(state_shape, in_features, out_features, where: str, what: str) -> tuple[int, int]:
    if state_shape is None or len(state_shape) != 2:
        raise CheckpointError(f"{where}.{what}: shape {state_shape!r} is not [N, K]")
    n, k = int(state_shape[0]), int(state_shape[1])
    if (in_features is not None and k != in_features) or (out_features is not None and n != out_features):
        raise CheckpointError(f"{where}.{what}: shape [{n}, {k}], the model's layer is [{out_features}, "
                              f"{in_features}]")  # fmt: skip
    return n, k


def convert_4bit(tensors: dict[str, torch.Tensor], config: dict, in_features, out_features, where) -> ImportedLinear:
    blobs = [(t, tensors[f"weight.quant_state.bitsandbytes__{t}"]) for t in QUANT_TYPES
             if f"weight.quant_state.bitsandbytes__{t}" in tensors]  # fmt: skip
    if len(blobs) != 1:
        raise CheckpointError(f"{where}: expected one weight.quant_state.bitsandbytes__nf4 or __fp4 tensor, found "
                              f"{len(blobs)}")  # fmt: skip
    key_type, blob = blobs[0]
    state = read_quant_state(blob, where)
    quant_type = state.get("quant_type", key_type)
    if quant_type != key_type:
        raise CheckpointError(f"{where}.weight.quant_state: quant_type {quant_type!r} (key says {key_type!r})")
    n, k = _shape(state.get("shape"), in_features, out_features, where, "weight.quant_state")
    block = int(state.get("blocksize", 64))
    if block not in BLOCKSIZES:
        raise CheckpointError(f"{where}.weight.quant_state: blocksize {block} is not one of {BLOCKSIZES}")
    double_quant = "nested_absmax" in state or "weight.nested_absmax" in tensors or "nested_offset" in state
    scheme = Bnb4(quant_type, double_quant, block)
    weight = tensors.get("weight")
    if weight is None:
        raise CheckpointError(f"{where}.weight: missing, expected the 4-bit codes of [{n}, {k}]")
    raw = weight.contiguous().view(torch.uint8).reshape(-1)  # bnb_4bit_quant_storage only types the bytes
    if raw.numel() != (n * k + 1) // 2:
        raise CheckpointError(f"{where}.weight: holds {raw.numel()} bytes, expected {(n * k + 1) // 2} (4-bit codes "
                              f"of [{n}, {k}])")  # fmt: skip
    _table(tensors, where, "weight.quant_map", blockwise.table(quant_type), f"the {quant_type} table")
    blocks = scheme.n_blocks(n, k)
    named = {"qweight": raw}
    if not double_quant:
        named["absmax"] = expect(tensors.get("weight.absmax"), where, "weight.absmax", (blocks,), torch.float32,
                                 "no double quantization")  # fmt: skip
    else:
        if int(state.get("nested_blocksize", NESTED_BLOCKSIZE)) != NESTED_BLOCKSIZE:
            raise CheckpointError(f"{where}.weight.quant_state: nested_blocksize {state['nested_blocksize']}, only "
                                  f"{NESTED_BLOCKSIZE} is read")  # fmt: skip
        if "nested_offset" not in state:
            raise CheckpointError(f"{where}.weight.quant_state: double quantization without nested_offset")
        _table(tensors, where, "weight.nested_quant_map", blockwise.dynamic_map(), "bitsandbytes' 8-bit dynamic map")
        named["absmax"] = expect(tensors.get("weight.absmax"), where, "weight.absmax", (blocks,), torch.uint8,
                                 "double quantization: 8-bit codes")  # fmt: skip
        named["nested_absmax"] = expect(tensors.get("weight.nested_absmax"), where, "weight.nested_absmax",
                                        (-(-blocks // NESTED_BLOCKSIZE),), torch.float32)  # fmt: skip
        named["nested_offset"] = torch.tensor([float(state["nested_offset"])], dtype=torch.float32)
    packed = PackedWeight(named)
    scheme.check_packed(packed, n, k, where=where)
    return ImportedLinear(scheme.name, packed, k, n, None, _bias(tensors, where, n))


def convert_8bit(tensors: dict[str, torch.Tensor], config: dict, in_features, out_features, where) -> ImportedLinear:
    weight = tensors.get("weight")
    if weight is None or weight.dim() != 2:
        raise CheckpointError(f"{where}.weight: expected int8 [N, K] (CB), got "
                              f"{'nothing' if weight is None else list(weight.shape)}")  # fmt: skip
    n, k = _shape(list(weight.shape), in_features, out_features, where, "weight")
    expect(weight, where, "weight", (n, k), torch.int8, "row-wise int8 codes (CB)")
    scb = expect(tensors.get("SCB"), where, "SCB", (n,), torch.float32, "absmax of each weight row")
    layout = tensors.get("weight_format")
    if layout is not None and int(layout.reshape(-1)[0]) != 0:
        raise CheckpointError(f"{where}.weight_format: {int(layout.reshape(-1)[0])}, only 0 (row-major) is read")
    threshold = config.get("llm_int8_threshold", DEFAULT_THRESHOLD)
    try:
        scheme = LLMInt8(float(threshold))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{where}: llm_int8_threshold={threshold!r}: {error}") from None
    return ImportedLinear(scheme.name, scheme.pack(Int8Rows(weight, scb)), k, n, None, _bias(tensors, where, n))


def convert(tensors: dict[str, torch.Tensor], config: dict, *, in_features: int | None = None,
            out_features: int | None = None, where: str = "layer") -> ImportedLinear:  # fmt: skip
    """One layer (local names: 4-bit ``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_*``,
    ``weight.quant_state.bitsandbytes__<type>``; 8-bit ``weight``, ``SCB``, ``weight_format``; ``bias``) →
    :class:`ImportedLinear`."""
    check_config(config)
    if "SCB" in tensors:
        return convert_8bit(tensors, config, in_features, out_features, where)
    return convert_4bit(tensors, config, in_features, out_features, where)
