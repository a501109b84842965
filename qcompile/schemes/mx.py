"""What the OCP MX 6- and 8-bit families ``mxfp6`` and ``mxfp8`` share: element types, E8M0 scales, fp6 packing,
the scheme base.

Source: OCP Microscaling Formats (MX) v1.0. A block of 32 elements along K shares one E8M0 scale ``2**(s - 127)``;
each element is a small float. **Element types** (:data:`ELEMENTS`; sign bit first, then exponent, then mantissa)::

    name   bits  exponent  mantissa  bias  largest  emax  specials
    e2m3   6     2         3         1     7.5      2     none
    e3m2   6     3         2         3     28       4     none
    e4m3   8     4         3         7     448      8     S.1111.111 is NaN (no infinities)
    e5m2   8     5         2         15    57344    15    exponent 11111: infinity (mantissa 0) or NaN

A code's magnitude bits ``E.M`` (exponent field ``E``, mantissa field ``m``) are worth ``2**(E - bias) * (1 +
m / 2**M)``, or ``2**(1 - bias) * m / 2**M`` when ``E = 0`` (subnormals); the top bit is the sign. ``emax`` is the
exponent of the largest normal value, ``floor(log2(largest))``.

**Scale rule** (the spec's, section 6.3): per block ``e = clamp(floor(log2(amax)) - emax, -127, 127)`` (``-127`` when
``amax = 0``), stored as the byte ``e + 127`` (255, NaN, is never written). ``floor(log2(amax))`` is read from the
float32 ``amax``'s exponent (``frexp``), exact.

**Element rounding** (:func:`encode`): ``v / 2**e`` (exact: a power of two) to the nearest representable value, a
tie to the even code (even mantissa bit), saturating at the largest finite value; the sign bit is the value's (a
negative value that rounds to 0 is -0); NaN gets magnitude 0. No NaN or infinity code is ever produced.

**Quantization arithmetic**: in float32 on the float32 values (block ``amax``, then ``v * 2**-e``, exact), so a
float32 kernel reproduces every code bit for bit; dequantized values ``element * 2**e`` are exact in float64 (and in
float32 for every scale a float32 tensor produces).

**fp6 packing** (:func:`pack_fp6`, as compressed-tensors' ``pack_fp6_to_uint8``): 4 codes in 3 bytes; element
``4j + i`` in bits ``6i .. 6i + 5`` of the little-endian 24-bit word of bytes ``3j .. 3j + 2`` (so element ``i`` of a
row sits in bits ``6i ..`` of the row read as one little-endian bit string).

**Scheme names**: ``<family>-<element>[-w<b>a<b>]`` (``mxfp6-e3m2``, ``mxfp8-e4m3-w8a8``). The ``-w6a6`` / ``-w8a8``
suffix quantizes each activation row at run time to the same element type, per group of 32 along K, by the same rule.
``K`` is zero-padded to ``Kp``, a multiple of 32; padding columns meet zero activations.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import ClassVar

import torch

from qcompile.schemes.base import PackedWeight, Scheme, TensorSpec, ceil_to, pad_columns
from qcompile.schemes.mxfp4 import E8M0_BIAS, e8m0_decode

GROUP = 32


@dataclasses.dataclass(frozen=True)
class ElementFormat:
    """One MX element type (module docstring): ``bits`` in all, ``ebits`` exponent and ``mbits`` mantissa bits,
    exponent ``bias``, ``specials`` one of ``"none"``, ``"fn"`` (all-ones magnitude is NaN), ``"ieee"`` (all-ones
    exponent is infinity or NaN)."""

    name: str
    bits: int
    ebits: int
    mbits: int
    bias: int
    specials: str

    def magnitude(self, bits: int) -> float:
        """The value of magnitude bits ``E.M`` (the code without its sign bit), from the definition."""
        e, m = bits >> self.mbits, bits & ((1 << self.mbits) - 1)
        if self.specials == "fn" and bits == (1 << (self.bits - 1)) - 1:
            return math.nan
        if self.specials == "ieee" and e == (1 << self.ebits) - 1:
            return math.inf if m == 0 else math.nan
        if e == 0:
            return math.ldexp(m, 1 - self.bias - self.mbits)
        return math.ldexp((1 << self.mbits) + m, e - self.bias - self.mbits)

    @property
    def values(self) -> tuple[float, ...]:
        """The value of each of the ``2**bits`` codes (NaN / infinity where the type has them)."""
        half = 1 << (self.bits - 1)
        magnitudes = [self.magnitude(c) for c in range(half)]
        return tuple(magnitudes) + tuple(-v for v in magnitudes)

    @property
    def finite(self) -> tuple[float, ...]:
        """The finite non-negative values, ascending, indexed by their codes ``0 .. len - 1``."""
        half = self.values[: 1 << (self.bits - 1)]
        return tuple(v for v in half if math.isfinite(v))

    @property
    def max_value(self) -> float:
        return self.finite[-1]

    @property
    def emax(self) -> int:
        """``floor(log2(max_value))``."""
        return math.frexp(self.max_value)[1] - 1


ELEMENTS = {
    "e2m3": ElementFormat("e2m3", 6, 2, 3, 1, "none"),
    "e3m2": ElementFormat("e3m2", 6, 3, 2, 3, "none"),
    "e4m3": ElementFormat("e4m3", 8, 4, 3, 7, "fn"),
    "e5m2": ElementFormat("e5m2", 8, 5, 2, 15, "ieee"),
}


def encode(values: torch.Tensor, fmt: ElementFormat) -> torch.Tensor:
    """Round ``values`` (already divided by their scale; rounded to float32 first) to ``fmt`` codes, ``uint8`` of the
    same shape: nearest, ties to even, saturating, sign bit kept (module docstring)."""
    finite = torch.tensor(fmt.finite, dtype=torch.float32, device=values.device)
    mids = (finite[1:] + finite[:-1]) / 2  # exact in float32
    magnitude = values.to(torch.float32).abs()
    index = torch.bucketize(magnitude, mids)  # how many midpoints lie strictly below
    tie = (magnitude == mids[index.clamp(max=mids.numel() - 1)]) & (index % 2 == 1)  # a tie goes up to the even
    index = torch.where(torch.isnan(magnitude), 0, index + tie.to(index.dtype))
    sign = torch.signbit(values).to(torch.uint8) << (fmt.bits - 1)
    return index.to(torch.uint8) | sign


def decode(codes: torch.Tensor, fmt: ElementFormat, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values of ``fmt`` ``codes`` (integers in ``[0, 2**bits)``), in ``dtype``."""
    table = torch.tensor(fmt.values, dtype=dtype, device=codes.device)
    return table[codes.long()]


def e8m0_encode(amax: torch.Tensor, emax: int) -> torch.Tensor:
    """``uint8`` E8M0 block scales from float32 block ``amax`` for elements of exponent ``emax`` (module docstring)."""
    _, exponent = torch.frexp(amax.to(torch.float32))  # amax = m * 2**exponent, 0.5 <= m < 1: floor(log2) = exponent-1
    shared = torch.clamp(exponent.to(torch.int32) - 1 - emax, -E8M0_BIAS, E8M0_BIAS)
    shared = torch.where(amax > 0, shared, torch.full_like(shared, -E8M0_BIAS))
    return (shared + E8M0_BIAS).to(torch.uint8)


def pack_fp6(codes: torch.Tensor) -> torch.Tensor:
    """``uint8 [..., Kp]`` 6-bit codes (``Kp % 4 == 0``) → ``uint8 [..., Kp * 3 / 4]`` (module docstring)."""
    k = codes.shape[-1]
    if k % 4:
        raise ValueError(f"fp6 packing takes whole groups of 4 codes, got a row of {k}")
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], k // 4, 4)
    word = c[..., 0] | (c[..., 1] << 6) | (c[..., 2] << 12) | (c[..., 3] << 18)
    packed = torch.stack([word & 0xFF, (word >> 8) & 0xFF, word >> 16], dim=-1)
    return packed.to(torch.uint8).reshape(*codes.shape[:-1], k // 4 * 3)


def unpack_fp6(packed: torch.Tensor, k_padded: int) -> torch.Tensor:
    """Inverse of :func:`pack_fp6`: ``uint8 [..., Kp * 3 / 4]`` → ``uint8 [..., Kp]`` codes."""
    if packed.dtype != torch.uint8 or packed.shape[-1] * 4 != k_padded * 3:
        raise ValueError(f"packed fp6 rows are uint8 of {k_padded * 3 // 4} bytes for Kp={k_padded}, got "
                         f"{packed.dtype} {list(packed.shape)}")  # fmt: skip
    b = packed.to(torch.int32).reshape(*packed.shape[:-1], k_padded // 4, 3)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    codes = torch.stack([(word >> (6 * i)) & 0x3F for i in range(4)], dim=-1)
    return codes.reshape(*packed.shape[:-1], k_padded).to(torch.uint8)


@dataclasses.dataclass
class MXWeight:
    """Unpacked form of an MX ``[N, K]`` weight: ``codes uint8 [N, Kp]`` (one element code each, padding columns 0),
    ``scales uint8 [N, Kp / 32]`` (E8M0), ``in_features`` the true ``K``."""

    codes: torch.Tensor
    scales: torch.Tensor
    in_features: int

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]


@dataclasses.dataclass(frozen=True)
class MXScheme(Scheme):
    """Base of the MX 6- and 8-bit schemes: ``element`` (a key of :data:`ELEMENTS` the family allows) and
    ``activations`` (the ``-w<b>a<b>`` suffix). A family sets ``family``, ``bits``, ``elements`` (its element types)
    and ``qweight_dtype`` (``element -> torch dtype`` of ``qweight``)."""

    element: str
    activations: bool = False

    bits: ClassVar[int]
    elements: ClassVar[tuple[str, ...]]
    group_size: ClassVar[int] = GROUP

    def __post_init__(self):
        if self.element not in self.elements:
            raise ValueError(f"{self.family}: element type {self.element!r} is not one of {', '.join(self.elements)}")

    @property
    def quantizes_activations(self) -> bool:  # type: ignore[override]
        return self.activations

    @property
    def fmt(self) -> ElementFormat:
        return ELEMENTS[self.element]

    # -- names ----------------------------------------------------------------------------------------------------
    @classmethod
    def suffix(cls) -> str:
        return f"-w{cls.bits}a{cls.bits}"

    @property
    def name(self) -> str:
        return f"{self.family}-{self.element}" + (self.suffix() if self.activations else "")

    @classmethod
    def from_name(cls, name):
        if name != cls.family and not name.startswith(cls.family + "-"):
            return None
        match = re.fullmatch(rf"{cls.family}-(?P<element>e\dm\d)(?P<act>{cls.suffix()})?", name)
        if match is None or match["element"] not in cls.elements:
            forms = " or ".join(f"{cls.family}-{e}[{cls.suffix()}]" for e in cls.elements)
            raise ValueError(f"malformed {cls.family} name; the forms are {forms} (element type, then the optional "
                             f"activation suffix)")  # fmt: skip
        return cls(element=match["element"], activations=bool(match["act"]))

    # -- geometry and tensors -------------------------------------------------------------------------------------
    def padded_in_features(self, in_features):
        return ceil_to(in_features, GROUP)

    def group_size_for(self, in_features):
        return GROUP

    def qweight_spec(self, out_features: int, k_padded: int) -> TensorSpec:
        raise NotImplementedError

    def tensors(self, out_features, in_features):
        kp = self.padded_in_features(in_features)
        return (self.qweight_spec(out_features, kp),
                TensorSpec("scales", (out_features, kp // GROUP), torch.uint8,
                           "E8M0 exponent per group of 32 along K: 2**(s - 127)"))  # fmt: skip

    def pack_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """``uint8 [N, Kp]`` codes → the stored ``qweight``."""
        raise NotImplementedError

    def unpack_codes(self, qweight: torch.Tensor, k_padded: int) -> torch.Tensor:
        """The stored ``qweight`` → ``uint8 [N, Kp]`` codes."""
        raise NotImplementedError

    # -- quantization ---------------------------------------------------------------------------------------------
    def quantize_rows(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``values [R, Kp]`` (``Kp % 32 == 0``) → ``(codes uint8 [R, Kp], scales uint8 [R, Kp / 32])`` in float32
        arithmetic (module docstring)."""
        r, kp = values.shape
        blocks = values.to(torch.float32).reshape(r, kp // GROUP, GROUP)
        scales = e8m0_encode(blocks.abs().amax(-1), self.fmt.emax)
        inverse = torch.pow(2.0, E8M0_BIAS - scales.to(torch.float64)).to(torch.float32).unsqueeze(-1)  # 2**-e
        return encode(blocks * inverse, self.fmt).reshape(r, kp), scales

    def dequantize_rows(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """float64 ``[R, Kp]``: ``element(code) * 2**(s - 127)``, exact."""
        r, kp = codes.shape
        values = decode(codes, self.fmt, torch.float64).reshape(r, kp // GROUP, GROUP)
        return (values * e8m0_decode(scales, torch.float64).unsqueeze(-1)).reshape(r, kp)

    def quantize(self, weight):
        n, k = weight.shape
        codes, scales = self.quantize_rows(pad_columns(weight.to(torch.float32), self.padded_in_features(k)))
        return MXWeight(codes, scales, k)

    def dequantize(self, q):
        return self.dequantize_rows(q.codes, q.scales)[:, : q.in_features].to(torch.float32)

    def pack(self, q):
        packed = PackedWeight({"qweight": self.pack_codes(q.codes), "scales": q.scales})
        return self.checked_pack(packed, q.out_features, q.in_features)

    def unpack(self, packed: PackedWeight, in_features):
        codes = self.unpack_codes(packed["qweight"], self.padded_in_features(in_features))
        return MXWeight(codes, packed["scales"], in_features)

    # -- reference matmul -----------------------------------------------------------------------------------------
    def quantize_activations(self, xp: torch.Tensor) -> torch.Tensor:
        """The padded input ``[M, Kp]`` → float64 values of its per-token, per-32 quantization (of its float32
        values)."""
        return self.dequantize_rows(*self.quantize_rows(xp))

    def reference_linear(self, x, packed, bias, out_features):
        """``y = Q(x_p) @ W_p.T + bias`` in float64 (``Q`` only with the activation suffix), cast to ``x.dtype``."""
        k = x.shape[-1]
        lead = x.shape[:-1]
        named = PackedWeight.from_list(self, packed, out_features, k)
        q = self.unpack(named, k)
        w = self.dequantize_rows(q.codes, q.scales)
        xp = pad_columns(x.reshape(-1, k).to(torch.float64), self.padded_in_features(k))
        if self.activations:
            xp = self.quantize_activations(xp)
        y = xp @ w.t()
        if bias is not None:
            y = y + bias.to(torch.float64)
        return y.to(x.dtype).reshape(*lead, out_features)
