"""What the FP4 (E2M1) families ``mxfp4`` and ``nvfp4`` share: element codes, the Hadamard rotation, the scheme base.

**E2M1 code** (4 bits): bit 3 is the sign, bits 0-2 index the magnitudes ``E2M1_LEVELS = (0, 0.5, 1, 1.5, 2, 3,
4, 6)``. Two codes per byte along K, element ``2j`` in the low nibble and ``2j+1`` in the high nibble (as
compressed-tensors' ``pack_fp4_to_uint8``; :mod:`qcompile.schemes.packing`, 4 bits).

**Rounding to E2M1** (:func:`e2m1_encode`): to the nearest level, a tie to the level with an even mantissa bit
(an even index; ties 0.25 → 0, 0.75 → 1, 1.25 → 1, 1.75 → 2, 2.5 → 2, 3.5 → 4, 5 → 4), saturating at 6; the sign
bit is the value's, so a negative value that rounds to 0 is code 8 (-0); NaN gets magnitude index 0. This is
compressed-tensors' ``cast_to_fp4`` followed by ``pack_fp4_to_uint8`` code for code (checked in the tests).

**Scheme names** (both families): ``<fam>[-w4a4][-had[<h>]]``. ``-w4a4`` quantizes each activation row at run time
to the same format (per scale group along K, same scale rule); ``-had`` rotates the input by a block Hadamard of
the scale group's size, ``-had<h>`` of size ``h`` (:attr:`FP4Scheme.rotation_sizes`; ``-had<group>`` reads as
``-had``). Without a rotation ``K_padded`` (``Kp``) is ``K`` rounded up to whole groups; with one, to whole
multiples of ``max(group, h)``.

**Rotation**: ``H`` is the normalized Sylvester Hadamard matrix of size ``h`` (``H = H.T``, ``H @ H.T = I``,
entries ``±1/sqrt(h)``); ``Hb`` is block-diagonal ``[Kp, Kp]`` with ``Kp / h`` copies. The weight stored is
``quantize(W_p @ Hb)`` (``W_p`` the zero-padded ``[N, Kp]`` weight) and the matmul is

    y = Q(x_p @ Hb) @ Q(W_p @ Hb).T + bias        (Q on activations only with -w4a4)

which approximates ``x @ W.T`` since ``Hb @ Hb.T = I``. ``H`` is a function of ``h``, so no tensor holds it.
:meth:`FP4Scheme.dequantize` returns the weight back in the input's basis (``Q(W_p Hb) @ Hb.T``, first ``K``
columns): ``x @ dequantize(q).T`` is the weight-only matmul, and what autograd differentiates.

**Rounding arithmetic**: quantization runs in float32 on the float32 values (of the rotated row, rotated in
float64): block ``amax``, the scales in the order each family documents, ``unit`` (what one code step of a block is
worth) and ``v / unit``, so a float32 kernel reproduces every code bit for bit (up to the rotation's own rounding).
Without this, bfloat16 activations land exactly on E2M1 ties in float32 and a hair off them in float64. The rotation
and the matmul of the reference are float64.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import ClassVar

import torch

from qcompile.schemes.base import PackedWeight, Scheme, TensorSpec, ceil_to, pad_columns
from qcompile.schemes.packing import pack_codes, packed_row_bytes, unpack_codes

#: magnitudes of the E2M1 codes 0-7; codes 8-15 are their negatives
E2M1_LEVELS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: the value of each of the 16 codes
E2M1_VALUES = E2M1_LEVELS + tuple(-v for v in E2M1_LEVELS)
E2M1_MAX = 6.0
#: thresholds on |v|: the code index is how many are passed; ``>=`` where the tie goes up (to an even index)
_UP_AT_TIE = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def e2m1_encode(values: torch.Tensor) -> torch.Tensor:
    """Round ``values`` (any float dtype, already divided by their scale) to E2M1 codes, ``uint8`` of the same shape
    (see the module docstring: nearest, ties to even, saturating, sign bit kept)."""
    magnitude = values.abs()
    index = torch.zeros(values.shape, dtype=torch.uint8, device=values.device)
    for threshold, up_at_tie in _UP_AT_TIE:
        index += (magnitude >= threshold if up_at_tie else magnitude > threshold).to(torch.uint8)
    return index | (torch.signbit(values).to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values of E2M1 ``codes`` (integers in ``[0, 16)``), in ``dtype``."""
    table = torch.tensor(E2M1_VALUES, dtype=dtype, device=codes.device)
    return table[codes.long()]


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """``uint8 [..., Kp]`` codes → ``uint8 [..., Kp/2]``: element ``2j`` in the low nibble, ``2j+1`` in the high."""
    return pack_codes(codes, 4)


def unpack_e2m1(packed: torch.Tensor, k_padded: int) -> torch.Tensor:
    """Inverse of :func:`pack_e2m1`."""
    return unpack_codes(packed, 4, k_padded)


def hadamard(size: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix ``[size, size]`` (``size`` a power of two): ``H = [[A, A], [A, -A]]
    / sqrt(2)`` from ``A`` of half the size, ``H = [[1]]`` for 1. Built on each call (under a fake-tensor trace
    too: no cached real tensor meets fake ones)."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"a Hadamard rotation has a power-of-two size, got {size}")
    h = torch.ones(1, 1, dtype=torch.float64, device=device)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(size)).to(dtype)


def rotate(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x [..., Kp] @ Hb``: each block of ``size`` consecutive elements times :func:`hadamard` (``Kp % size == 0``),
    in ``x.dtype``."""
    kp = x.shape[-1]
    if kp % size:
        raise ValueError(f"rotate: the last dimension ({kp}) is not a multiple of the Hadamard size {size}")
    blocks = x.reshape(*x.shape[:-1], kp // size, size)
    return (blocks @ hadamard(size, x.dtype, x.device)).reshape(x.shape)


@dataclasses.dataclass
class FP4Weight:
    """Unpacked form of an FP4 ``[N, K]`` weight.

    ``codes``: ``uint8 [N, Kp]`` E2M1 codes, one per element, of the (rotated) padded weight; ``scales``: ``[N, Kp /
    group]`` in the family's stored dtype; ``global_scale``: ``float32 [1]`` or ``None`` (mxfp4); ``in_features``:
    the true ``K``.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor | None
    in_features: int

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]


@dataclasses.dataclass(frozen=True)
class FP4Scheme(Scheme):
    """Base of the FP4 schemes: ``activations`` (``-w4a4``) and ``rotation`` (Hadamard size, or ``None``).

    A family sets ``family``, ``group_size`` (elements per scale along K), ``rotation_sizes``, ``scale_dtype`` and
    the scale rule (:meth:`global_scales`, :meth:`encode_scales`, :meth:`scale_values`).
    """

    activations: bool = False
    rotation: int | None = None
    version: int = 1

    group_size: ClassVar[int]
    rotation_sizes: ClassVar[tuple[int, ...]]
    scale_dtype: ClassVar[torch.dtype]
    scale_doc: ClassVar[str]

    def __post_init__(self):
        if self.rotation is not None and self.rotation not in self.rotation_sizes:
            sizes = ", ".join(map(str, self.rotation_sizes))
            raise ValueError(f"{self.family}: Hadamard size {self.rotation} is not one of {sizes}")

    @property
    def quantizes_activations(self) -> bool:  # type: ignore[override]
        return self.activations

    # -- names ----------------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        out = self.family + ("-w4a4" if self.activations else "")
        if self.rotation is not None:
            out += "-had" if self.rotation == self.group_size else f"-had{self.rotation}"
        return out

    @classmethod
    def from_name(cls, name):
        if name != cls.family and not name.startswith(cls.family + "-"):
            return None
        match = re.fullmatch(rf"{cls.family}(?P<w4a4>-w4a4)?(?P<had>-had(?P<size>\d+)?)?", name)
        if match is None:
            sizes = ", ".join(map(str, cls.rotation_sizes))
            raise ValueError(f"malformed {cls.family} name; the form is {cls.family}[-w4a4][-had[<size>]] in this "
                             f"order, with size one of {sizes} (-had alone: {cls.group_size})")  # fmt: skip
        rotation = None
        if match["had"]:
            rotation = int(match["size"]) if match["size"] else cls.group_size
        return cls(activations=bool(match["w4a4"]), rotation=rotation)

    # -- geometry -------------------------------------------------------------------------------------------------
    def padded_in_features(self, in_features):
        return ceil_to(in_features, max(self.group_size, self.rotation or 1))

    def group_size_for(self, in_features):
        return self.group_size

    def extra_tensors(self, out_features: int, in_features: int) -> tuple[TensorSpec, ...]:
        """Packed tensors after ``qweight`` and ``scales`` (a family's global scale)."""
        return ()

    def tensors(self, out_features, in_features):
        kp = self.padded_in_features(in_features)
        rotated = f" of W_p @ Hb (Hadamard {self.rotation})" if self.rotation else ""
        return (TensorSpec("qweight", (out_features, packed_row_bytes(4, kp)), torch.uint8,
                           f"E2M1 codes{rotated}, element 2j in the low nibble, 2j+1 in the high one"),
                TensorSpec("scales", (out_features, kp // self.group_size), self.scale_dtype, self.scale_doc),
                *self.extra_tensors(out_features, in_features))  # fmt: skip

    # -- the scale rule (per family) ------------------------------------------------------------------------------
    def global_scales(self, amax_rows: torch.Tensor, per_row: bool) -> torch.Tensor | None:
        """float32 ``[R, 1]`` global scales from float32 ``amax_rows [R, 1]`` (``per_row``: one per row, else one for
        all), or ``None`` when the family has none."""
        return None

    def encode_scales(self, amax: torch.Tensor, global_scale: torch.Tensor | None) -> torch.Tensor:
        """Stored block scales ``[R, G]`` (``scale_dtype``) from float32 block ``amax [R, G]``."""
        raise NotImplementedError

    def scale_values(self, scales: torch.Tensor, global_scale: torch.Tensor | None) -> torch.Tensor:
        """float32 ``[R, G]`` units: what one code step of each block is worth (block scale times any global scale,
        a float32 product)."""
        raise NotImplementedError

    # -- quantization ---------------------------------------------------------------------------------------------
    def quantize_rows(self, values: torch.Tensor, per_row: bool):
        """``values [R, Kp]`` (``Kp`` a multiple of the group) → ``(codes uint8 [R, Kp], scales [R, G], global
        float32 [R or 1, 1] or None)``, in float32 arithmetic (module docstring): the family's scale rule on the block
        ``amax``, then ``e2m1(v / unit)`` (code 0 where the unit is 0)."""
        r, kp = values.shape
        blocks = values.to(torch.float32).reshape(r, kp // self.group_size, self.group_size)
        amax = blocks.abs().amax(-1)
        row_amax = amax.amax(-1, keepdim=True) if per_row else amax.amax().reshape(1, 1)
        global_scale = self.global_scales(row_amax, per_row)
        scales = self.encode_scales(amax, global_scale)
        unit = self.scale_values(scales, global_scale).unsqueeze(-1)
        scaled = torch.where(unit > 0, blocks / torch.where(unit > 0, unit, 1.0), torch.zeros_like(blocks))
        return e2m1_encode(scaled).reshape(r, kp), scales, global_scale

    def dequantize_rows(self, codes: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor | None):
        """float64 ``[R, Kp]`` values of ``codes`` under ``scales`` (in the rotated basis): ``e2m1 * unit``, exact."""
        r, kp = codes.shape
        unit = self.scale_values(scales, global_scale).to(torch.float64).unsqueeze(-1)
        values = e2m1_decode(codes, torch.float64).reshape(r, kp // self.group_size, self.group_size) * unit
        return values.reshape(r, kp)

    def rotated_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x [R, K]`` → float64 ``x_p @ Hb`` ``[R, Kp]`` (``x_p`` when there is no rotation)."""
        xp = pad_columns(x.to(torch.float64), self.padded_in_features(x.shape[-1]))
        return rotate(xp, self.rotation) if self.rotation else xp

    def quantize(self, weight):
        n, k = weight.shape
        codes, scales, global_scale = self.quantize_rows(self.rotated_input(weight), per_row=False)
        return FP4Weight(codes, scales, None if global_scale is None else global_scale.reshape(1), k)

    def dequantize_rotated(self, q: FP4Weight) -> torch.Tensor:
        """float64 ``[N, Kp]``: ``Q(W_p @ Hb)``, the weight the rotated input meets."""
        return self.dequantize_rows(q.codes, q.scales, q.global_scale)

    def dequantize(self, q):
        w = self.dequantize_rotated(q)
        if self.rotation:
            w = rotate(w, self.rotation)  # Hb is symmetric: Q(W_p Hb) @ Hb.T
        return w[:, : q.in_features].to(torch.float32)

    def pack(self, q):
        tensors = {"qweight": pack_e2m1(q.codes), "scales": q.scales}
        if q.global_scale is not None:
            tensors["global_scale"] = q.global_scale
        return self.checked_pack(PackedWeight(tensors), q.out_features, q.in_features)

    def unpack(self, packed: PackedWeight, in_features):
        codes = unpack_e2m1(packed["qweight"], self.padded_in_features(in_features))
        return FP4Weight(codes, packed["scales"], packed.get("global_scale"), in_features)

    # -- reference matmul -----------------------------------------------------------------------------------------
    def quantize_activations(self, xr: torch.Tensor) -> torch.Tensor:
        """``-w4a4``: the float64 rotated input ``[M, Kp]`` → float64 values of its per-token quantization."""
        codes, scales, global_scale = self.quantize_rows(xr, per_row=True)
        return self.dequantize_rows(codes, scales, global_scale)

    def reference_linear(self, x, packed, bias, out_features):
        """``y = Q(x_p @ Hb) @ Q(W_p @ Hb).T + bias`` in float64 (see the module docstring), cast to ``x.dtype``."""
        k = x.shape[-1]
        lead = x.shape[:-1]
        named = PackedWeight.from_list(self, packed, out_features, k)
        w = self.dequantize_rotated(self.unpack(named, k))
        xr = self.rotated_input(x.reshape(-1, k))
        if self.activations:
            xr = self.quantize_activations(xr)
        y = xr @ w.t()
        if bias is not None:
            y = y + bias.to(torch.float64)
        return y.to(x.dtype).reshape(*lead, out_features)
