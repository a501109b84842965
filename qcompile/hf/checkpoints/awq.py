"""AWQ GEMM checkpoints (AutoAWQ ``version: gemm``) → qcompile ``int4-g<g>``.

Per linear layer ``<m>`` (``W [N, K]``, ``g`` = ``group_size``, ``G = ceil(K / g)``; ``N`` a multiple of 8)::

    <m>.qweight  int32   [K, N / 8]   4-bit codes packed along N: nibble i (bits 4i..4i+3) of word [k, c] is
                                       column 8c + ORDER[i], ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
    <m>.qzeros   int32   [G, N / 8]   zero points, the same interleave
    <m>.scales   float16 [G, N]
    <m>.bias     float16 [N]          optional

    W[n, k] = (q[k, n] - z[k // g, n]) * s[k // g, n]          (always asymmetric; zeros stored as is)

The codes and zeros carry over exactly (``int4-g<g>`` stores the zero as a float in code units). GEMV, GEMV-fast,
Marlin and other repacked versions, ``zero_point: false`` and bits other than 4 are refused by name.
"""

from __future__ import annotations

import torch

from qcompile.hf.checkpoints.common import (CheckpointError, ImportedLinear, check_bits, expect, integer_layer,
                                            unpack_dense)

METHOD = "awq"
TENSORS = ("qweight", "qzeros", "scales", "bias")
#: column of nibble i within its word
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: nibble that holds column j within its word
REVERSE_ORDER = tuple(ORDER.index(j) for j in range(8))


def layers(names, config: dict, modules: dict | None = None) -> dict[str, tuple[dict, dict[str, str]]]:
    """``{layer: (config, {local tensor name: checkpoint name})}`` for every layer with a ``qweight``."""
    names = set(names)
    return {layer: (config, {t: f"{layer}.{t}" for t in TENSORS if f"{layer}.{t}" in names})
            for layer in (name.removesuffix(".qweight") for name in sorted(names) if name.endswith(".qweight"))}


def unpack_interleaved(words: torch.Tensor, count: int) -> torch.Tensor:
    """``int32 [R, count / 8]`` AWQ words → ``int64 [R, count]`` codes in column order."""
    nibbles = unpack_dense(words, 4, count).reshape(words.shape[0], -1, 8)
    return nibbles[..., list(REVERSE_ORDER)].reshape(words.shape[0], count)


def convert(tensors: dict[str, torch.Tensor], config: dict, *, in_features: int | None = None,
            out_features: int | None = None, where: str = "layer") -> ImportedLinear:  # fmt: skip
    """One AWQ GEMM layer (local names ``qweight``, ``qzeros``, ``scales``, ``bias``) → :class:`ImportedLinear`."""
    version = str(config.get("version") or config.get("format") or "gemm").lower()
    if version != "gemm":
        raise CheckpointError(f"AWQ version {version!r} is not supported (only 'gemm'; GEMV and kernel-specific forms "
                              f"lay the codes out differently)")  # fmt: skip
    if not config.get("zero_point", True):
        raise CheckpointError("AWQ zero_point=false (symmetric AWQ) is not supported")
    check_bits(config.get("bits", config.get("w_bit", 4)), (4,), where)
    group = int(config.get("group_size", config.get("q_group_size", 128)))
    qweight, scales = tensors.get("qweight"), tensors.get("scales")
    if qweight is None or scales is None:
        raise CheckpointError(f"{where}: an AWQ layer needs qweight and scales, found {', '.join(tensors)}")
    k = in_features if in_features is not None else qweight.shape[0]
    n = out_features if out_features is not None else scales.shape[-1]
    if n % 8:
        raise CheckpointError(f"{where}: N={n} is not a multiple of 8 (AWQ packs 8 columns per word)")
    g = k if group == -1 else group
    groups = -(-k // g)
    why = f"bits=4, group_size={group}, [N={n}, K={k}]"
    expect(qweight, where, "qweight", (k, n // 8), torch.int32, why)
    expect(scales, where, "scales", (groups, n), (torch.float16, torch.bfloat16, torch.float32), why)
    qzeros = expect(tensors.get("qzeros"), where, "qzeros", (groups, n // 8), torch.int32, why)
    bias = tensors.get("bias")
    if bias is not None:
        expect(bias, where, "bias", (n,), (torch.float16, torch.bfloat16, torch.float32))
    codes = unpack_interleaved(qweight, n).t()  # [N, K]
    zeros = unpack_interleaved(qzeros, n).t()  # [N, G]
    return integer_layer(codes, scales.t(), zeros, bits=4, group_size=None if group == -1 else g, where=where,
                         bias=bias)  # fmt: skip
