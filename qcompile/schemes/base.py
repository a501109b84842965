"""What every quantization scheme provides.

A scheme is data: a frozen dataclass with a short name (``int4-g128``, ``w8a8``, ``fp8``) that
round-trips through :func:`qcompile.schemes.parse_scheme`. It owns

* its reference quantizer (round-to-nearest; calibration algorithms write the same canonical form),
* its canonical unpacked form, :class:`QuantizedWeight` (codes + scales + zeros),
* its packed form: the three tensors ``qweight, scales, zeros`` that the ``qcompile::linear`` op takes,
* its reference matmul in plain PyTorch — the oracle every fast kernel is tested against.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import ClassVar

import torch


@dataclasses.dataclass
class QuantizedWeight:
    """Canonical unpacked form of a quantized ``[N, K]`` weight.

    ``codes``: ``[N, K_padded]`` integer (or float8) codes, one per element, *unpacked*.
    ``scales``: ``float32 [N, groups]``; ``zeros``: ``float32 [N, groups]`` or ``None`` (symmetric).
    ``in_features``: the true ``K``; columns ``K .. K_padded`` are padding that no activation meets.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    in_features: int

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]


@dataclasses.dataclass
class PackedWeight:
    """The tensors the ``qcompile::linear`` op takes, in the scheme's canonical packed layout."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


class Scheme(abc.ABC):
    """Base of the scheme dataclasses. Subclasses are ``@dataclass(frozen=True)``."""

    #: family name, used in docs and errors
    family: ClassVar[str]
    #: does the scheme quantize activations on the fly (W8A8-style)?
    quantizes_activations: ClassVar[bool] = False

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Short string form; ``parse_scheme(s.name) == s``."""

    @classmethod
    @abc.abstractmethod
    def from_name(cls, name: str) -> Scheme | None:
        """Parse ``name``; return ``None`` when it is not of this family."""

    # -- geometry -------------------------------------------------------------------------------
    @abc.abstractmethod
    def padded_in_features(self, in_features: int) -> int:
        """``K`` rounded up to what the packed layout holds (a whole number of groups / units)."""

    def group_size_for(self, in_features: int) -> int:
        """Elements sharing one scale along K (``K_padded`` when per channel)."""
        return self.padded_in_features(in_features)

    def num_groups(self, in_features: int) -> int:
        return self.padded_in_features(in_features) // self.group_size_for(in_features)

    @abc.abstractmethod
    def packed_nbytes(self, out_features: int, in_features: int) -> int:
        """Bytes of the packed tensors for an ``[N, K]`` weight (must equal ``pack(...).nbytes``)."""

    # -- reference quantization -------------------------------------------------------------------
    @abc.abstractmethod
    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        """Round-to-nearest quantization of a float ``[N, K]`` weight."""

    @abc.abstractmethod
    def dequantize(self, q: QuantizedWeight) -> torch.Tensor:
        """``float32 [N, K]`` (padding dropped)."""

    @abc.abstractmethod
    def pack(self, q: QuantizedWeight) -> PackedWeight:
        """Canonical packed tensors (see the layout table in the scheme's module)."""

    @abc.abstractmethod
    def unpack(self, packed: PackedWeight, in_features: int) -> QuantizedWeight:
        """Inverse of :meth:`pack`."""

    def check_packed(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, in_features: int):
        """Raise ``ValueError`` naming the tensor when packed shapes/dtypes do not fit this scheme."""
        n = scales.shape[0]
        expected = self.pack_shapes(n, in_features)
        got = {"qweight": qweight, "scales": scales, "zeros": zeros}
        for key, spec in expected.items():
            t = got[key]
            if spec is None:
                if t is not None:
                    raise ValueError(f"{self.name}: expected no {key} tensor")
                continue
            if t is None:
                raise ValueError(f"{self.name}: missing {key} tensor")
            shape, dtype = spec
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(
                    f"{self.name}: {key} is {t.dtype}{list(t.shape)}, "
                    f"expected {dtype}{list(shape)} for K={in_features}"
                )

    @abc.abstractmethod
    def pack_shapes(self, out_features: int, in_features: int) -> dict[str, tuple | None]:
        """``{"qweight": (shape, dtype), "scales": ..., "zeros": ... or (None, None)}``."""

    # -- reference compute ------------------------------------------------------------------------
    def dequantize_packed(self, qweight, scales, zeros, in_features: int) -> torch.Tensor:
        return self.dequantize(self.unpack(PackedWeight(qweight, scales, zeros), in_features))

    def reference_linear(self, x, qweight, scales, zeros, bias) -> torch.Tensor:
        """``y = x @ dequant(W).T + bias`` in plain PyTorch, computed in ``x.dtype``."""
        w = self.dequantize_packed(qweight, scales, zeros, x.shape[-1]).to(x.dtype)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))

    def __str__(self) -> str:
        return self.name


def ceil_to(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple)) * multiple


def pad_columns(weight: torch.Tensor, k_padded: int) -> torch.Tensor:
    """Zero-pad ``[N, K]`` on the right to ``[N, k_padded]``."""
    k = weight.shape[-1]
    if k == k_padded:
        return weight
    return torch.nn.functional.pad(weight, (0, k_padded - k))
