"""GPTQ checkpoints (AutoGPTQ ``gptq`` / v1 and GPTQModel ``gptq_v2``) → qcompile ``int<b>[-gN][-sym]``.

Per linear layer ``<m>`` (``W [N, K]``, ``b`` = ``bits``, ``g`` = ``group_size``, ``G = ceil(K / g)``, 1 when
``group_size`` is -1)::

    <m>.qweight  int32   [K * b / 32, N]   codes packed along K: column n is a bit stream, element k at bit k*b
                                            (LSB first; 3-bit elements straddle words, 32 per 3 words)
    <m>.qzeros   int32   [G, N * b / 32]   zero points packed along N the same way
    <m>.scales   float16 [G, N]
    <m>.g_idx    int32   [K]               group of input column k (absent: k // g)
    <m>.bias     float16 [N]               optional

    v1 ("gptq"):     W[n, k] = scales[g_idx[k], n] * (q[k, n] - (qzeros[g_idx[k], n] + 1))   (stored zero = zero - 1)
    v2 ("gptq_v2"):  W[n, k] = scales[g_idx[k], n] * (q[k, n] - qzeros[g_idx[k], n])

The qcompile layer keeps the codes ``q`` and stores ``zero`` as a float (``int<b>-g<g>``: ``w = (u - zero) * s``;
a v1 stored zero of ``2**b - 1`` reads back as ``2**b``, as the GPTQ kernels compute it). ``sym: true`` needs every
zero to be ``2**(b-1)`` and gives ``int<b>-g<g>-sym``. When ``g_idx`` is not ``k // g`` (``desc_act``), the layer
gets a static input permutation ``perm = argsort(g_idx)`` (stable): ``W[:, perm]`` has contiguous groups, and the
layer computes ``x.index_select(-1, perm) @ W[:, perm].T``; each group must then hold exactly ``g`` columns
(``K - (G-1) g`` for the last). Bits 2, 3, 4, 8; ``checkpoint_format`` ``marlin`` and other repacked forms are
refused by name.
"""

from __future__ import annotations

import torch

from qcompile.hf.checkpoints.common import (CheckpointError, ImportedLinear, check_bits, expect, integer_layer,
                                            unpack_dense)

METHOD = "gptq"
TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")
FORMATS = ("gptq", "gptq_v2")


def checkpoint_format(config: dict) -> str:
    fmt = config.get("checkpoint_format") or config.get("format") or "gptq"
    if fmt not in FORMATS:
        raise CheckpointError(f"GPTQ checkpoint_format {fmt!r} is not supported (supported: {', '.join(FORMATS)}); "
                              f"its tensors are repacked for one kernel")  # fmt: skip
    return fmt


def layers(names, config: dict, modules: dict | None = None) -> dict[str, tuple[dict, dict[str, str]]]:
    """``{layer: (config, {local tensor name: checkpoint name})}`` for every layer with a ``qweight``."""
    names = set(names)
    return {layer: (config, {t: f"{layer}.{t}" for t in TENSORS if f"{layer}.{t}" in names})
            for layer in (name.removesuffix(".qweight") for name in sorted(names) if name.endswith(".qweight"))}


def convert(tensors: dict[str, torch.Tensor], config: dict, *, in_features: int | None = None,
            out_features: int | None = None, where: str = "layer") -> ImportedLinear:  # fmt: skip
    """One GPTQ layer (local names ``qweight``, ``qzeros``, ``scales``, ``g_idx``, ``bias``) → :class:`ImportedLinear`.
    ``in_features`` / ``out_features`` (from the model) are checked against the tensors when given."""
    bits = check_bits(config.get("bits", 4), (2, 3, 4, 8), where)
    fmt = checkpoint_format(config)
    group = int(config.get("group_size", 128))
    symmetric = bool(config.get("sym", True))
    qweight = tensors.get("qweight")
    scales = tensors.get("scales")
    if qweight is None or scales is None:
        raise CheckpointError(f"{where}: a GPTQ layer needs qweight and scales, found {', '.join(tensors)}")
    n = out_features if out_features is not None else scales.shape[-1]
    k = in_features if in_features is not None else qweight.shape[0] * 32 // bits
    if (k * bits) % 32:
        raise CheckpointError(f"{where}: K={k} at {bits} bits does not fill whole int32 words (GPTQ packs K * bits "
                              f"/ 32 words per column)")  # fmt: skip
    if (n * bits) % 32:
        raise CheckpointError(f"{where}: N={n} at {bits} bits does not fill whole int32 words of qzeros")
    g = k if group == -1 else group
    if g <= 0:
        raise CheckpointError(f"{where}: group_size={group} is not a positive size or -1")
    groups = -(-k // g)
    why = f"bits={bits}, group_size={group}, [N={n}, K={k}]"
    expect(qweight, where, "qweight", (k * bits // 32, n), torch.int32, why)
    expect(scales, where, "scales", (groups, n), (torch.float16, torch.bfloat16, torch.float32), why)
    qzeros = expect(tensors.get("qzeros"), where, "qzeros", (groups, n * bits // 32), torch.int32, why)
    g_idx = tensors.get("g_idx")
    default_idx = torch.arange(k, dtype=torch.int64) // g
    if g_idx is None:
        g_idx = default_idx
    else:
        g_idx = expect(g_idx, where, "g_idx", (k,), (torch.int32, torch.int64), why).to(torch.int64)
    bias = tensors.get("bias")
    if bias is not None:
        expect(bias, where, "bias", (n,), (torch.float16, torch.bfloat16, torch.float32))

    codes = unpack_dense(qweight.t().contiguous(), bits, k)  # [N, K]
    zeros = unpack_dense(qzeros, bits, n).t()  # [N, G]
    if fmt == "gptq":
        zeros = zeros + 1
    permutation = None
    if not torch.equal(g_idx, default_idx):
        permutation = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[permutation], default_idx):
            raise CheckpointError(f"{where}.g_idx: its groups are not {g} columns each (group_size={group}); "
                                  f"group sizes {torch.bincount(g_idx, minlength=groups).tolist()[:8]}…")  # fmt: skip
        codes = codes[:, permutation]
    if symmetric:
        middle = 2 ** (bits - 1)
        if not bool((zeros == middle).all()):
            bad = zeros[zeros != middle].unique()[:4].tolist()
            raise CheckpointError(f"{where}.qzeros: sym=true but zero points {bad} are not 2**(bits-1)={middle} "
                                  f"({fmt})")  # fmt: skip
        zeros = None
    layer = integer_layer(codes, scales.t(), zeros, bits=bits, group_size=None if group == -1 else g, where=where,
                          permutation=permutation, bias=bias)  # fmt: skip
    if permutation is not None:
        layer.notes = ("desc_act: static input permutation",)
    return layer
