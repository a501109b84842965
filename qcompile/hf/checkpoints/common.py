"""What the checkpoint importers share: the imported layer, the error, tensor checks, dense bit unpacking, the
integer re-lay and the input-permuted linear module.

An importer turns the tensors of one quantized linear layer (``W [N, K]``: ``N`` out_features, ``K`` in_features)
into an :class:`ImportedLinear`: a qcompile scheme name and that scheme's declared packed tensors holding the
checkpoint's codes (integer zero points become float zeros exactly, 16-bit scales become float32 exactly), plus an
optional static input permutation (GPTQ ``desc_act``). Nothing goes through a float weight.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from qcompile.nn import QuantizedLinear
from qcompile.schemes import PackedWeight, parse_scheme
from qcompile.schemes.base import QuantizedWeight, describe, pad_columns
from qcompile.schemes.integer import IntWeightOnly


class CheckpointError(ValueError):
    """A checkpoint that cannot be imported exactly: names the layer, the tensor, what was expected and what came."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def expect(tensor: torch.Tensor | None, where: str, name: str, shape, dtypes, why: str = "") -> torch.Tensor:
    """``tensor`` after checking its shape and dtype; :class:`CheckpointError` naming ``where.name`` otherwise."""
    dtypes = (dtypes,) if isinstance(dtypes, torch.dtype) else tuple(dtypes)
    wanted = "|".join(dtype_name(d) for d in dtypes) + str(list(shape))
    because = f" ({why})" if why else ""
    if tensor is None:
        raise CheckpointError(f"{where}.{name}: missing, expected {wanted}{because}")
    if tuple(tensor.shape) != tuple(shape) or tensor.dtype not in dtypes:
        raise CheckpointError(f"{where}.{name}: is {describe(tensor)}, expected {wanted}{because}")
    return tensor


def unpack_dense(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """``int32 [..., W]`` → ``int64 [..., count]`` unsigned codes packed LSB first along the last dimension.

    Each run of 32 elements fills ``bits`` consecutive words as one bit stream: element ``i`` of the run starts at
    bit ``i * bits`` (bit ``b`` of word ``j`` is stream bit ``32 j + b``), so for 2, 4 and 8 bits word ``j`` holds
    elements ``32/bits * j ..`` with element ``i`` in bits ``bits*i ..``, and 3-bit elements 10 and 21 of a run
    straddle two words (AutoGPTQ's 3-bit layout, compressed-tensors 0.20's dense packing)."""
    if words.dtype != torch.int32:
        raise TypeError(f"packed words must be int32, got {words.dtype}")
    lead, n_words = words.shape[:-1], words.shape[-1]
    runs = -(-n_words // bits)
    w = torch.nn.functional.pad(words.to(torch.int64) & 0xFFFFFFFF, (0, runs * bits - n_words))
    w = torch.nn.functional.pad(w.reshape(*lead, runs, bits), (0, 1))  # a zero word after each run
    mask = (1 << bits) - 1
    out = []
    for i in range(32):
        word, offset = divmod(i * bits, 32)
        value = w[..., word] >> offset
        if offset + bits > 32:
            value = value | (w[..., word + 1] << (32 - offset))
        out.append(value & mask)
    return torch.stack(out, dim=-1).reshape(*lead, runs * 32)[..., :count]


def pack_dense(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`unpack_dense`: unsigned codes ``[..., C]`` → ``int32 [..., ceil(C * bits / 32)]``."""
    lead, count = codes.shape[:-1], codes.shape[-1]
    runs = -(-count // 32)
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, runs * 32 - count)).reshape(*lead, runs, 32)
    w = torch.zeros(*lead, runs, bits + 1, dtype=torch.int64)
    for i in range(32):
        word, offset = divmod(i * bits, 32)
        w[..., word] |= (c[..., i] << offset) & 0xFFFFFFFF
        if offset + bits > 32:
            w[..., word + 1] |= c[..., i] >> (32 - offset)
    words = w[..., :bits].reshape(*lead, runs * bits)[..., : math.ceil(count * bits / 32)]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


class PermutedQuantizedLinear(QuantizedLinear):
    """A :class:`QuantizedLinear` whose input columns are permuted first: ``y = x.index_select(-1, perm) @ Wp.T +
    bias`` where ``Wp`` (packed) holds ``W[:, perm]``, so ``y = x @ W.T + bias``.

    Buffer ``input_permutation``: ``int64 [K]``, a permutation of ``0 .. K-1`` (GPTQ ``desc_act`` checkpoints: it
    makes each quantization group a contiguous run of columns).
    """

    def __init__(self, in_features: int, out_features: int, scheme: str, packed: PackedWeight, bias=None,
                 permutation: torch.Tensor | None = None):  # fmt: skip
        super().__init__(in_features, out_features, scheme, packed, bias)
        if permutation is None or tuple(permutation.shape) != (in_features,):
            got = "none" if permutation is None else describe(permutation)
            raise ValueError(f"PermutedQuantizedLinear({self.scheme}): input_permutation is {got}, expected "
                             f"int64[{in_features}]")  # fmt: skip
        self.register_buffer("input_permutation", permutation.to(torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.index_select(-1, self.input_permutation))

    def dequantized_weight(self) -> torch.Tensor:
        """``float32 [N, K]`` in the original input order."""
        return unpermute_columns(super().dequantized_weight(), self.input_permutation)


def unpermute_columns(w_permuted: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """``W`` from ``W[:, permutation]``."""
    w = torch.empty_like(w_permuted)
    w[:, permutation] = w_permuted
    return w


@dataclasses.dataclass
class ImportedLinear:
    """One quantized linear layer of a checkpoint in qcompile's terms.

    ``scheme``: a qcompile scheme name; ``packed``: that scheme's declared tensors for ``[out_features,
    in_features]``; ``permutation``: ``int64 [K]`` or ``None`` — when set, ``packed`` holds ``W[:, permutation]`` and
    the layer computes ``x.index_select(-1, permutation) @ W[:, permutation].T``; ``bias``: the checkpoint's bias or
    ``None``; ``notes``: what the import had to decide (empty when it is a plain re-lay).
    """

    scheme: str
    packed: PackedWeight
    in_features: int
    out_features: int
    permutation: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    notes: tuple[str, ...] = ()

    def dequantized_weight(self) -> torch.Tensor:
        """``float32 [N, K]`` in the checkpoint's input order."""
        w = parse_scheme(self.scheme).dequantize_packed(self.packed, self.out_features, self.in_features)
        return w if self.permutation is None else unpermute_columns(w, self.permutation)

    def module(self, dtype: torch.dtype | None = None) -> QuantizedLinear:
        """The eager module (a :class:`PermutedQuantizedLinear` when there is a permutation); ``dtype`` casts the
        bias."""
        bias = self.bias if self.bias is None or dtype is None else self.bias.to(dtype)
        if self.permutation is None:
            return QuantizedLinear(self.in_features, self.out_features, self.scheme, self.packed, bias)
        return PermutedQuantizedLinear(self.in_features, self.out_features, self.scheme, self.packed, bias,
                                       self.permutation)  # fmt: skip


def integer_layer(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, *, bits: int,
                  group_size: int | None, where: str, activations: str | None = None,
                  permutation: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> ImportedLinear:  # fmt: skip
    """An ``int<bits>`` layer from unsigned codes ``u [N, K]`` (``0 <= u < 2**bits``), scales ``[N, G]`` and zero
    points ``[N, G]`` in unsigned code units (``None``: symmetric, zero ``2**(bits-1)``), ``w = (u - zero) * scale``.

    The qcompile scheme is ``IntWeightOnly(bits, group_size, symmetric)`` (8 bits: codes and zeros stored minus 128,
    as that family does); ``activations`` names a scheme with the same packed tensors that also quantizes the
    activations (``w8a8``, ``w4a8-…``). Scales and zeros become float32 exactly (16-bit floats and integers are)."""
    n, k = codes.shape
    try:
        weights = IntWeightOnly(bits=bits, group_size=group_size, symmetric=zeros is None)
    except ValueError as error:
        raise CheckpointError(f"{where}: no qcompile integer scheme for this layer: {error}") from None
    kp = weights.padded_in_features(k)
    groups = kp // weights.group_size_for(k)
    if tuple(scales.shape) != (n, groups) or (zeros is not None and tuple(zeros.shape) != (n, groups)):
        raise CheckpointError(f"{where}: {groups} groups of {weights.group_size_for(k)} along K={k} expected, the "
                              f"scales are {describe(scales)}")  # fmt: skip
    codes = pad_columns(codes.to(torch.int64), kp)
    zeros32 = None if zeros is None else zeros.to(torch.float32)
    if bits == 8:
        codes = (codes - 128).to(torch.int8)
        zeros32 = None if zeros32 is None else zeros32 - 128
    else:
        codes = codes.to(torch.uint8)
    q = QuantizedWeight(codes.contiguous(), scales.to(torch.float32).contiguous(),
                        None if zeros32 is None else zeros32.contiguous(), k)  # fmt: skip
    packed = weights.pack(q)
    scheme = parse_scheme(activations).name if activations else weights.name
    parse_scheme(scheme).check_packed(packed, n, k, where=where)
    return ImportedLinear(scheme, packed, k, n, permutation, bias)


def check_bits(bits, allowed, where: str, key: str = "bits") -> int:
    if bits not in allowed:
        raise CheckpointError(f"{where}: {key}={bits!r} is not supported (supported: "
                              f"{', '.join(map(str, allowed))})")  # fmt: skip
    return int(bits)
