"""What every quantization scheme provides.

A scheme is data: a frozen dataclass with a short name (``int4-g128``, ``w8a8``, ``mxfp4``) that
round-trips through :func:`qcompile.schemes.parse_scheme`. It owns

* the **declaration of its packed tensors** (:meth:`Scheme.tensors`: name, shape, dtype, meaning for an
  ``[N, K]`` weight, in the order the ``qcompile::linear`` op takes them); the byte count, the size assertion
  and every shape check (:meth:`Scheme.check_packed`, the ``.qpt`` reader, the op) derive from it;
* its reference quantizer (round-to-nearest; calibration algorithms write the same canonical form) and its
  canonical unpacked form (:class:`QuantizedWeight` for element-wise grids; a family may define its own);
* :meth:`Scheme.pack` / :meth:`Scheme.unpack` between the two;
* its reference matmul in plain PyTorch — the oracle every fast kernel is tested against.

What else a family brings (kernel rows, ONNX lowering, the algorithms that can write it) lives in the family
registry, :mod:`qcompile.schemes.registry`.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Sequence
from typing import ClassVar

import torch


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One packed tensor of a scheme for a given ``[N, K]`` weight.

    ``dynamic``: data-dependent axes, ``((axis, symbol), ...)`` (e.g. the outlier count of a sparse part). ``shape``
    holds their smallest size (what the tensor has when the data adds nothing, e.g. no outliers); a packed tensor may
    have any size there, but every tensor of one weight that names the same symbol must have the same size
    (:meth:`Scheme.check_packed`). ``nbytes`` counts the smallest size."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    doc: str = ""
    dynamic: tuple[tuple[int, str], ...] = ()

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def describe(self) -> str:
        symbols = dict(self.dynamic)
        dims = [symbols.get(axis, size) for axis, size in enumerate(self.shape)]
        return f"{str(self.dtype).removeprefix('torch.')}[{', '.join(map(str, dims))}]"

    def fits(self, tensor: torch.Tensor) -> bool:
        """Dtype, rank and every fixed axis as declared (the dynamic axes may have any size)."""
        if tensor.dtype != self.dtype or tensor.dim() != len(self.shape):
            return False
        dynamic = {axis for axis, _ in self.dynamic}
        return all(axis in dynamic or got == want for axis, (got, want) in enumerate(zip(tensor.shape, self.shape)))


def describe(tensor: torch.Tensor) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}"


@dataclasses.dataclass
class QuantizedWeight:
    """Canonical unpacked form of an element-wise quantized ``[N, K]`` weight.

    ``codes``: ``[N, K_padded]`` integer (or float8 / float4 index) codes, one per element, *unpacked*.
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


class PackedWeight:
    """The tensors the ``qcompile::linear`` op takes for one weight, by declared name and in declared order.

    ``packed["scales"]`` or ``packed.scales`` reads one; :meth:`list` gives the op's tensor list.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._tensors = dict(tensors)

    @classmethod
    def from_list(cls, scheme: Scheme, tensors: Sequence[torch.Tensor], out_features: int, in_features: int):
        """Name a tensor list by the scheme's declaration (the count must match)."""
        specs = scheme.tensors(out_features, in_features)
        if len(tensors) != len(specs):
            raise ValueError(f"{scheme.name}: {len(tensors)} packed tensors, expected {len(specs)} "
                             f"({', '.join(s.name for s in specs)})")  # fmt: skip
        return cls({spec.name: t for spec, t in zip(specs, tensors)})

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._tensors)

    def list(self) -> list[torch.Tensor]:
        return list(self._tensors.values())

    def names(self) -> list[str]:
        return list(self._tensors)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def get(self, name: str, default=None):
        return self._tensors.get(name, default)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __getattr__(self, name: str) -> torch.Tensor:
        tensors = self.__dict__.get("_tensors", {})
        if name in tensors:
            return tensors[name]
        raise AttributeError(f"packed weight has no tensor {name!r} (it has {', '.join(tensors)})")

    def to(self, *args, **kwargs) -> PackedWeight:
        return PackedWeight({k: t.to(*args, **kwargs) for k, t in self._tensors.items()})

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def __repr__(self) -> str:
        return "PackedWeight(" + ", ".join(f"{k}={describe(t)}" for k, t in self._tensors.items()) + ")"


class Scheme(abc.ABC):
    """Base of the scheme dataclasses. Subclasses are ``@dataclass(frozen=True)``."""

    #: family name: the registry key (:mod:`qcompile.schemes.registry`), used in docs and errors
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

    def integer_grid(self) -> Scheme | None:
        """The integer-grid scheme whose codes GPTQ, AWQ and HQQ write for this scheme, or ``None``."""
        return None

    # -- the packed tensors ---------------------------------------------------------------------
    @abc.abstractmethod
    def tensors(self, out_features: int, in_features: int) -> tuple[TensorSpec, ...]:
        """The packed tensors of an ``[N, K]`` weight, in the order the op takes them."""

    def packed_nbytes(self, out_features: int, in_features: int) -> int:
        """Bytes of the packed tensors for an ``[N, K]`` weight (``pack(...).nbytes`` equals it)."""
        return sum(spec.nbytes for spec in self.tensors(out_features, in_features))

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        return 8 * self.packed_nbytes(out_features, in_features) / (out_features * in_features)

    def check_packed(self, tensors: Sequence[torch.Tensor] | PackedWeight, out_features: int, in_features: int,
                     where: str = "") -> None:  # fmt: skip
        """Raise ``ValueError`` naming the site (``where``), the tensor, what was expected and what came, when
        the packed tensors do not fit this scheme's declaration (count, shape, dtype)."""
        if isinstance(tensors, PackedWeight):
            tensors = tensors.list()
        specs = self.tensors(out_features, in_features)
        at = f"{where}: " if where else ""
        shape = f"[N={out_features}, K={in_features}]"
        if len(tensors) != len(specs):
            raise ValueError(f"{at}{self.name} takes {len(specs)} packed tensors "
                             f"({', '.join(s.name for s in specs)}) for {shape}, got {len(tensors)}")  # fmt: skip
        sizes: dict[str, tuple[int, str]] = {}  # dynamic symbol -> (size, the tensor that fixed it)
        for spec, tensor in zip(specs, tensors):
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"{at}{self.name}: {spec.name} is {type(tensor).__name__}, expected a tensor")
            if not spec.fits(tensor):
                raise ValueError(f"{at}{self.name}: {spec.name} is {describe(tensor)}, expected {spec.describe()} "
                                 f"for {shape}")  # fmt: skip
            for axis, symbol in spec.dynamic:
                size, first = sizes.setdefault(symbol, (tensor.shape[axis], spec.name))
                if tensor.shape[axis] != size:
                    raise ValueError(f"{at}{self.name}: {spec.name} has {symbol}={tensor.shape[axis]} on axis {axis}, "
                                     f"but {first} has {symbol}={size}")  # fmt: skip

    def checked_pack(self, packed: PackedWeight, out_features: int, in_features: int) -> PackedWeight:
        """``packed`` after the size assertion every ``pack`` ends with (dynamic axes counted at their packed size)."""
        self.check_packed(packed, out_features, in_features)
        specs = self.tensors(out_features, in_features)
        extra = sum((packed[s.name].numel() - math.prod(s.shape)) * s.dtype.itemsize for s in specs if s.dynamic)
        assert packed.nbytes == self.packed_nbytes(out_features, in_features) + extra
        return packed

    # -- reference quantization -------------------------------------------------------------------
    @abc.abstractmethod
    def quantize(self, weight: torch.Tensor):
        """Round-to-nearest quantization of a float ``[N, K]`` weight into the family's unpacked form."""

    @abc.abstractmethod
    def dequantize(self, q) -> torch.Tensor:
        """``float32 [N, K]`` (padding dropped)."""

    @abc.abstractmethod
    def pack(self, q) -> PackedWeight:
        """Canonical packed tensors (see the layout table in the scheme's module)."""

    @abc.abstractmethod
    def unpack(self, packed: PackedWeight, in_features: int):
        """Inverse of :meth:`pack`."""

    # -- reference compute ------------------------------------------------------------------------
    def dequantize_packed(self, packed: Sequence[torch.Tensor] | PackedWeight, out_features: int,
                          in_features: int) -> torch.Tensor:  # fmt: skip
        """``float32 [N, K]`` from the op's tensor list (or a :class:`PackedWeight`)."""
        if not isinstance(packed, PackedWeight):
            packed = PackedWeight.from_list(self, packed, out_features, in_features)
        return self.dequantize(self.unpack(packed, in_features))

    def reference_linear(self, x: torch.Tensor, packed: Sequence[torch.Tensor], bias: torch.Tensor | None,
                         out_features: int) -> torch.Tensor:  # fmt: skip
        """``y = x @ dequant(W).T + bias`` in plain PyTorch, computed in ``x.dtype``."""
        w = self.dequantize_packed(packed, out_features, x.shape[-1]).to(x.dtype)
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
