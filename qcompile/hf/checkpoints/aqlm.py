"""AQLM checkpoints (transformers ``AqlmConfig``, the ``aqlm`` package's ``QuantizedLinear``) → qcompile
``aqlm-<M>x<B>[-g<ig>]``.

``quantization_config``: ``{"quant_method": "aqlm", "in_group_size": ig, "out_group_size": 1, "num_codebooks": M,
"nbits_per_codebook": B, "linear_weights_not_to_quantize": [...]}``. Per linear layer ``<m>`` (``W [N, K]``,
``K`` a multiple of ``ig``, ``G = K / ig``, ``E = 2**B``)::

    <m>.codes      int8 (B <= 8) / int16 (B <= 16)  [N, G, M]   stored signed with wrap; the entry is value mod E
    <m>.codebooks  float16 (or any float)            [M, E, 1, ig]
    <m>.scales     float16 (or any float)            [N, 1, 1, 1]
    <m>.bias       float                             [N]          optional

    W[n, g*ig + j] = scales[n] * sum_m codebooks[m, codes[n, g, m] mod E, 0, j]

This is qcompile's own ``aqlm`` layout: the codes carry over as they are. Codebooks and scales become float16; when
the checkpoint stores another float type they must be exactly representable in float16 (else refused, by name).
``out_group_size`` other than 1 and codes permuted for the aqlm package's CPU kernel (``[G, N, M]``) are refused.
"""

from __future__ import annotations

import torch

from qcompile.hf.checkpoints.common import CheckpointError, ImportedLinear, dtype_name, expect
from qcompile.schemes import PackedWeight
from qcompile.schemes.aqlm import Aqlm, code_dtype

METHOD = "aqlm"
TENSORS = ("codes", "codebooks", "scales", "bias")
FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def layers(names, config: dict, modules: dict | None = None) -> dict[str, tuple[dict, dict[str, str]]]:
    """``{layer: (config, {local tensor name: checkpoint name})}`` for every layer with ``codes``."""
    names = set(names)
    skip = set(config.get("linear_weights_not_to_quantize") or ())
    found = (name.removesuffix(".codes") for name in sorted(names) if name.endswith(".codes"))
    return {layer: (config, {t: f"{layer}.{t}" for t in TENSORS if f"{layer}.{t}" in names})
            for layer in found if f"{layer}.weight" not in skip and layer not in skip}  # fmt: skip


def scheme_of(config: dict, where: str = "layer") -> Aqlm:
    """The qcompile scheme of an AQLM ``quantization_config``."""
    out_group = int(config.get("out_group_size", 1))
    if out_group != 1:
        raise CheckpointError(f"{where}: AQLM out_group_size={out_group} is not supported (only 1)")
    try:
        return Aqlm(num_codebooks=int(config.get("num_codebooks", 1)), bits=int(config.get("nbits_per_codebook", 16)),
                    group_size=int(config.get("in_group_size", 8)))  # fmt: skip
    except ValueError as error:
        raise CheckpointError(f"{where}: no qcompile aqlm scheme for this config: {error}") from None


def _float16(tensor: torch.Tensor, where: str, name: str) -> tuple[torch.Tensor, str | None]:
    """``tensor`` as float16 (exactly), and a note when it was stored as another type."""
    if tensor.dtype == torch.float16:
        return tensor, None
    half = tensor.to(torch.float16)
    if not torch.equal(half.to(tensor.dtype), tensor):
        raise CheckpointError(f"{where}.{name}: {dtype_name(tensor.dtype)} values that float16 does not hold exactly "
                              f"(qcompile's aqlm layout stores float16)")  # fmt: skip
    return half, f"{name} {dtype_name(tensor.dtype)} → float16 (exact)"


def convert(tensors: dict[str, torch.Tensor], config: dict, *, in_features: int | None = None,
            out_features: int | None = None, where: str = "layer") -> ImportedLinear:  # fmt: skip
    """One AQLM layer (local names ``codes``, ``codebooks``, ``scales``, ``bias``) → :class:`ImportedLinear`."""
    scheme = scheme_of(config, where)
    m, e, ig = scheme.num_codebooks, scheme.entries, scheme.group_size
    codes = tensors.get("codes")
    if codes is None:
        raise CheckpointError(f"{where}.codes: missing (an AQLM layer has codes, codebooks, scales)")
    n = out_features if out_features is not None else codes.shape[0]
    k = in_features if in_features is not None else codes.shape[1] * ig
    if k % ig:
        raise CheckpointError(f"{where}: in_features K={k} is not a multiple of in_group_size={ig} (AQLM needs it)")
    why = f"{scheme.name}: {m} codebooks of {e} entries, in_group_size={ig}, [N={n}, K={k}]"
    expect(codes, where, "codes", (n, k // ig, m), code_dtype(scheme.bits), why)
    books = expect(tensors.get("codebooks"), where, "codebooks", (m, e, 1, ig), FLOATS, why)
    scales = expect(tensors.get("scales"), where, "scales", (n, 1, 1, 1), FLOATS, why)
    bias = tensors.get("bias")
    if bias is not None:
        expect(bias, where, "bias", (n,), FLOATS)
    books, note_books = _float16(books, where, "codebooks")
    scales, note_scales = _float16(scales, where, "scales")
    packed = PackedWeight({"codes": codes.contiguous(), "codebooks": books.contiguous(),
                           "scales": scales.contiguous()})  # fmt: skip
    scheme.check_packed(packed, n, k, where=where)
    notes = tuple(note for note in (note_books, note_scales) if note)
    return ImportedLinear(scheme.name, packed, k, n, None, bias, notes)
