"""SpQR checkpoints (transformers ``SpQRConfig``, the ``spqr_quant`` package's ``QuantizedLinear``) → qcompile
``spqr-3``.

``quantization_config``: ``{"quant_method": "spqr", "bits": 3, "beta1": 16, "beta2": 16, "shapes": {...},
"modules_to_not_convert": [...]}`` (transformers accepts only these bits and tile sizes; ``shapes`` holds each tensor's
length, which the tensors themselves carry). Per linear layer ``<m>`` (``W [N, K]``, ``Kp = ceil(K / 16) * 16``)::

    <m>.dense_weights  int64 [ceil(N/16) * Kp/16 * 16]  3-bit codes, 3-bit statistics, second-order bytes per word
    <m>.row_offsets    int32 [N + 1]                      CSR offsets of the outliers
    <m>.col_vals       int32 [nnz]                        float16 value << 16 | column (an empty tensor of any dtype
                                                          when the layer has no outliers, as ``merge_col_val`` makes)
    <m>.in_perm        int32 [Kp / 2]                     two uint16 input indices a word (empty: no permutation)
    <m>.bias           float [N]                          optional

This is qcompile's own ``spqr-3`` layout (``qcompile.schemes.spqr``): the tensors carry over as they are; an empty
``in_perm`` becomes the identity. Refused by name: other bits or tile sizes, ``spqr_quant``'s "ptcsr" outliers
(``row_offsets`` of ``N / 16 + 1`` entries), offsets that do not rise from 0 to the length of ``col_vals``, outlier
columns that are no input feature, an ``in_perm`` that is no permutation.
"""

from __future__ import annotations

import torch

from qcompile.hf.checkpoints.common import CheckpointError, ImportedLinear, check_bits, expect
from qcompile.schemes import PackedWeight
from qcompile.schemes.spqr import NAME, TILE, Spqr, validate

METHOD = "spqr"
TENSORS = ("dense_weights", "row_offsets", "col_vals", "in_perm", "bias")
FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def layers(names, config: dict, modules: dict | None = None) -> dict[str, tuple[dict, dict[str, str]]]:
    """``{layer: (config, {local tensor name: checkpoint name})}`` for every layer with ``dense_weights``."""
    names = set(names)
    skip = set(config.get("modules_to_not_convert") or ())
    found = (name.removesuffix(".dense_weights") for name in sorted(names) if name.endswith(".dense_weights"))
    return {layer: (config, {t: f"{layer}.{t}" for t in TENSORS if f"{layer}.{t}" in names})
            for layer in found if layer not in skip and f"{layer}.weight" not in skip}  # fmt: skip


def convert(tensors: dict[str, torch.Tensor], config: dict, *, in_features: int | None = None,
            out_features: int | None = None, where: str = "layer") -> ImportedLinear:  # fmt: skip
    """One SpQR layer (local names ``dense_weights``, ``row_offsets``, ``col_vals``, ``in_perm``, ``bias``) →
    :class:`ImportedLinear`. ``in_features`` is needed (the tensors do not hold ``K`` exactly)."""
    check_bits(config.get("bits", 3), (3,), where)
    for key in ("beta1", "beta2"):
        if config.get(key, TILE) != TILE:
            raise CheckpointError(f"{where}: {key}={config.get(key)!r} is not supported (SpQR tiles are 16x16)")
    offsets = tensors.get("row_offsets")
    if tensors.get("dense_weights") is None or offsets is None:
        raise CheckpointError(f"{where}: an SpQR layer needs dense_weights and row_offsets, found "
                              f"{', '.join(tensors)}")  # fmt: skip
    if in_features is None:
        raise CheckpointError(f"{where}: SpQR layers need in_features from the model")
    n = out_features if out_features is not None else offsets.shape[0] - 1
    k = in_features
    scheme = Spqr()
    kp = scheme.padded_in_features(k)
    why = f"spqr-3, [N={n}, K={k}]"
    if offsets.dim() == 1 and offsets.shape[0] == -(-n // TILE) + 1 and offsets.shape[0] != n + 1:
        raise CheckpointError(f"{where}.row_offsets: {offsets.shape[0]} entries is spqr_quant's 'ptcsr' outlier "
                              f"layout, which is not supported (CSR: N + 1 = {n + 1} entries)")  # fmt: skip
    specs = {spec.name: spec for spec in scheme.tensors(n, k)}
    dense = expect(tensors["dense_weights"], where, "dense_weights", specs["dense_weights"].shape, torch.int64, why)
    offsets = expect(offsets, where, "row_offsets", (n + 1,), torch.int32, why)
    col_vals = tensors.get("col_vals")
    if col_vals is None or col_vals.numel() == 0:
        col_vals = torch.zeros(0, dtype=torch.int32)
    elif col_vals.dim() != 1 or col_vals.dtype != torch.int32:
        raise CheckpointError(f"{where}.col_vals: is {col_vals.dtype}{list(col_vals.shape)}, expected int32[nnz]")
    in_perm = tensors.get("in_perm")
    if in_perm is None or in_perm.numel() == 0:
        identity = torch.arange(kp, dtype=torch.int64)
        in_perm = (identity[1::2] << 16 | identity[0::2]).to(torch.int32)
    else:
        in_perm = expect(in_perm, where, "in_perm", (kp // 2,), torch.int32, why)
    bias = tensors.get("bias")
    if bias is not None:
        expect(bias, where, "bias", (n,), FLOATS)
    packed = PackedWeight({"dense_weights": dense.contiguous(), "row_offsets": offsets.contiguous(),
                           "col_vals": col_vals.contiguous(), "in_perm": in_perm.contiguous()})  # fmt: skip
    try:
        validate(packed, n, k, where=where)
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    return ImportedLinear(NAME, packed, k, n, None, bias)
