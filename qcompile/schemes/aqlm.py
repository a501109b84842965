"""AQLM, additive quantization of language models (Egiazarian et al. 2024, arXiv:2401.06118; ``aqlm`` package
``inference.py`` / ``utils.py``): each group of ``ig`` consecutive weights of a row is the sum of ``M`` vectors, one
from each of ``M`` learned codebooks of ``2**B`` entries, times one scale per output row.

**Names**: ``aqlm-<M>x<B>[-g<ig>]``: ``M`` codebooks (1..8) of ``2**B`` entries (``B`` = 1..16 bits per code), input
groups of ``ig`` (1..32, default 8; ``-g8`` is not written). One output row per group (AQLM's ``out_group_size``
1). Examples: ``aqlm-1x16`` (AQLM's 1x16g8), ``aqlm-2x8``, ``aqlm-1x8-g4``.

**Packed tensors** (AQLM's own layout and dtypes, so checkpoints import with their exact codes; ``Kp`` = ``K``
rounded up to a multiple of ``ig``, ``G = Kp / ig``, ``E = 2**B``)::

    codes      int8 (B <= 8) / int16 (B > 8)  [N, G, M]      code m of group g of row n, stored signed with wrap
                                                            (AQLM's ``pack_int_data``): the code is ``value mod E``
    codebooks  float16 [M, E, 1, ig]                        entry c of codebook m: ig consecutive weights
    scales     float16 [N, 1, 1, 1]                         one per output row

    W[n, g*ig + j] = scales[n] * sum_m codebooks[m, codes[n, g, m] mod E, 0, j]        (float32; j < ig)

Columns ``K .. Kp`` are padding that no activation meets (AQLM itself requires ``K % ig == 0``; a padded layer is
no AQLM checkpoint layer, the importer refuses it).

**Bits per weight**: ``(N*G*M*B_stored + 16*M*E*ig + 16*N) / (N*K)`` with ``B_stored`` 8 or 16: codes ``M*B/ig``
(aqlm-1x16: 2, aqlm-2x8: 2, aqlm-1x8-g4: 2) plus the codebooks, which do not shrink with the layer: aqlm-1x16's
codebook is 1 MiB (65536 x 8 float16), 2.29 bits/weight on a 4096 x 4096 layer and 27 on a 576 x 576 one.
:meth:`Aqlm.bits_per_weight` counts all of it (the packed tensors' bytes).

**Data-free quantization** (:meth:`Aqlm.quantize`, what ``rtn`` writes): ``s_n`` = the row's RMS (float16);
groups of ``W_p / s`` (``[N*G, ig]``) → residual k-means (codebook ``m`` clusters what codebooks ``0..m-1`` left;
``KMEANS_ITERS`` Lloyd iterations from seeded random points) → ``REFINE_ROUNDS`` rounds of least-squares codebook
update and code reassignment (:mod:`qcompile.schemes.aqlm_codebooks`) → codebooks rounded to float16, codes
reassigned once more for the rounded entries → per-row least-squares scale ``<w_n, d_n> / <d_n, d_n>`` (float16).
One codebook with at least as many entries as there are groups: each group is its own entry (no search).
Seed 0: deterministic. The calibrated algorithm is ``aqlm`` (:mod:`qcompile.algorithms.aqlm`).
"""

from __future__ import annotations

import dataclasses
import re

import torch

from qcompile.schemes import aqlm_codebooks as cb
from qcompile.schemes.base import PackedWeight, Scheme, TensorSpec, ceil_to, describe, pad_columns
from qcompile.schemes.registry import Family, register_family

NAME = re.compile(r"aqlm-(?P<m>\d+)x(?P<b>\d+)(?:-g(?P<ig>\d+))?")
DEFAULT_GROUP = 8
MAX_CODEBOOKS = 8
MAX_BITS = 16
MAX_GROUP = 32
KMEANS_ITERS = 10
REFINE_ROUNDS = 3
FLOAT16_MAX = 65504.0


@dataclasses.dataclass
class AqlmWeight:
    """Unpacked AQLM weight: ``codes int64 [N, G, M]`` (unsigned, ``< 2**B``), ``codebooks float16 [M, 2**B, 1,
    ig]``, ``scales float16 [N, 1, 1, 1]``, ``in_features`` the true ``K``."""

    codes: torch.Tensor
    codebooks: torch.Tensor
    scales: torch.Tensor
    in_features: int

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]


def code_dtype(bits: int) -> torch.dtype:
    """AQLM's ``get_int_dtype``: int8 up to 8 bits, int16 up to 16."""
    return torch.int8 if bits <= 8 else torch.int16


def wrap_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes → AQLM's signed storage (``value >= 2**(B-1)`` stored as ``value - 2**B``)."""
    codes = codes.to(torch.int64)
    return torch.where(codes >= 2 ** (bits - 1), codes - 2**bits, codes).to(code_dtype(bits))


def unwrap_codes(stored: torch.Tensor, bits: int) -> torch.Tensor:
    """AQLM's ``unpack_int_data``: ``int64(stored) mod 2**B``."""
    return stored.to(torch.int64) % (2**bits)


@dataclasses.dataclass(frozen=True)
class Aqlm(Scheme):
    """``num_codebooks`` codebooks of ``2**bits`` entries of ``group_size`` weights, float16 scale per row."""

    num_codebooks: int = 1
    bits: int = 16
    group_size: int = DEFAULT_GROUP
    version: int = 1
    family = "aqlm"

    def __post_init__(self):
        if not 1 <= self.num_codebooks <= MAX_CODEBOOKS:
            raise ValueError(f"aqlm: the number of codebooks must be 1..{MAX_CODEBOOKS}, got {self.num_codebooks}")
        if not 1 <= self.bits <= MAX_BITS:
            raise ValueError(f"aqlm: bits per code must be 1..{MAX_BITS}, got {self.bits}")
        if not 1 <= self.group_size <= MAX_GROUP:
            raise ValueError(f"aqlm: the input group size must be 1..{MAX_GROUP}, got {self.group_size}")

    # -- names ----------------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        group = f"-g{self.group_size}" if self.group_size != DEFAULT_GROUP else ""
        return f"aqlm-{self.num_codebooks}x{self.bits}{group}"

    @classmethod
    def from_name(cls, name):
        if name != "aqlm" and not name.startswith("aqlm-"):
            return None
        match = NAME.fullmatch(name)
        if match is None:
            raise ValueError("malformed aqlm name; the form is aqlm-<M>x<B>[-g<ig>]: M codebooks (1..8) of 2**B "
                             "entries (B 1..16), input groups of ig (1..32, default 8), e.g. aqlm-1x16, aqlm-2x8, "
                             "aqlm-1x8-g4")  # fmt: skip
        ig = match["ig"]
        return cls(num_codebooks=int(match["m"]), bits=int(match["b"]), group_size=int(ig) if ig else DEFAULT_GROUP)

    # -- geometry -------------------------------------------------------------------------------------------------
    @property
    def entries(self) -> int:
        return 2**self.bits

    def padded_in_features(self, in_features):
        return ceil_to(in_features, self.group_size)

    def group_size_for(self, in_features):
        return self.group_size

    def tensors(self, out_features, in_features):
        groups = self.padded_in_features(in_features) // self.group_size
        m, e, ig = self.num_codebooks, self.entries, self.group_size
        return (TensorSpec("codes", (out_features, groups, m), code_dtype(self.bits),
                           f"code m of input group g of row n, stored signed: the entry is the value mod {e}"),
                TensorSpec("codebooks", (m, e, 1, ig), torch.float16, f"{m} codebooks of {e} vectors of {ig}"),
                TensorSpec("scales", (out_features, 1, 1, 1), torch.float16, "one scale per output row"))  # fmt: skip

    # -- quantization ---------------------------------------------------------------------------------------------
    def groups_of(self, weight: torch.Tensor) -> torch.Tensor:
        """float32 ``[N, G, ig]`` of ``weight [N, K]`` zero-padded to ``Kp``."""
        n, k = weight.shape
        kp = self.padded_in_features(k)
        return pad_columns(weight.to(torch.float32), kp).reshape(n, kp // self.group_size, self.group_size)

    def initial(self, weight: torch.Tensor, seed: int = 0):
        """The data-free search before rounding: ``(groups float32 [N, G, ig], norm [N] (the row RMS, float16
        values), codebooks float32 [M, E, ig], codes int64 [N*G, M])`` for the points ``groups / norm``."""
        n, k = weight.shape
        if not torch.isfinite(weight).all():
            raise ValueError(f"{self.name}: the weight [N={n}, K={k}] has non-finite values")
        groups = self.groups_of(weight)
        rms = groups.pow(2).mean((1, 2)).sqrt().clamp(max=FLOAT16_MAX).to(torch.float16).to(torch.float32)
        norm = torch.where(rms > 0, rms, torch.ones_like(rms))
        points = (groups / norm[:, None, None]).reshape(-1, self.group_size)
        generator = torch.Generator().manual_seed(seed)
        if self.num_codebooks == 1 and points.shape[0] <= self.entries:  # each group its own entry: exact
            books = cb.kmeans(points, self.entries, 0, generator).unsqueeze(0)
            return groups, norm, books, torch.arange(points.shape[0]).unsqueeze(-1)
        books, codes = cb.residual_kmeans(points, self.num_codebooks, self.entries, KMEANS_ITERS, generator)
        books, codes = cb.refine(points, books, codes, REFINE_ROUNDS)
        return groups, norm, books, codes

    def quantize(self, weight, seed: int = 0):
        """Data-free: residual k-means + refinement on the row-normalized groups (module docstring)."""
        groups, norm, books, codes = self.initial(weight, seed)
        exact = self.num_codebooks == 1 and codes.shape[0] <= self.entries
        return self.finish(groups, books, codes, norm, weight.shape[1], reassign=not exact)

    def finish(self, groups: torch.Tensor, books: torch.Tensor, codes: torch.Tensor, norm: torch.Tensor,
               in_features: int, reassign: bool = True) -> AqlmWeight:  # fmt: skip
        """Round float32 ``books [M, E, ig]`` to float16, reassign ``codes [N*G, M]`` for the rounded entries (points:
        ``groups [N, G, ig] / norm [N]``; unless ``reassign`` is false) and fit float16 per-row scales by least
        squares."""
        n, g, ig = groups.shape
        books16 = books.clamp(-FLOAT16_MAX, FLOAT16_MAX).to(torch.float16)
        books32 = books16.to(torch.float32)
        points = (groups / norm[:, None, None]).reshape(-1, ig)
        if reassign:
            codes = cb.reassign(points, books32, codes)
        return AqlmWeight(codes.reshape(n, g, self.num_codebooks), books16.reshape(self.num_codebooks, -1, 1, ig),
                          self.row_scales(groups, cb.decode(books32, codes).reshape(n, g, ig)),
                          in_features)  # fmt: skip

    @staticmethod
    def row_scales(groups: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
        """float16 ``[N, 1, 1, 1]``: per row the least-squares ``<w, d> / <d, d>`` (0 where ``d = 0``)."""
        w, d = groups.reshape(groups.shape[0], -1).double(), decoded.reshape(decoded.shape[0], -1).double()
        dd = (d * d).sum(-1)
        s = torch.where(dd > 0, (w * d).sum(-1) / torch.where(dd > 0, dd, 1.0), 0.0)
        return s.clamp(-FLOAT16_MAX, FLOAT16_MAX).to(torch.float16).reshape(-1, 1, 1, 1)

    def dequantize(self, q):
        n, g, m = q.codes.shape
        books = q.codebooks.to(torch.float32).reshape(self.num_codebooks, self.entries, self.group_size)
        w = cb.decode(books, q.codes.reshape(-1, m)).reshape(n, g * self.group_size)
        return (w * q.scales.to(torch.float32).reshape(n, 1))[:, : q.in_features]

    def pack(self, q):
        packed = PackedWeight({"codes": wrap_codes(q.codes, self.bits).contiguous(),
                               "codebooks": q.codebooks.contiguous(), "scales": q.scales.contiguous()})  # fmt: skip
        return self.checked_pack(packed, q.out_features, q.in_features)

    def unpack(self, packed: PackedWeight, in_features):
        codes = packed["codes"]
        if codes.dtype != code_dtype(self.bits):
            raise ValueError(f"{self.name}: codes is {describe(codes)}, expected {code_dtype(self.bits)}")
        return AqlmWeight(unwrap_codes(codes, self.bits), packed["codebooks"], packed["scales"], in_features)


register_family(Family(
    "aqlm", Aqlm, examples=("aqlm-2x8", "aqlm-1x16", "aqlm-1x8-g4"), algorithms=("aqlm",),
    kernels=("qcompile.codegen.cpp.aqlm", "qcompile.codegen.triton.aqlm"),
))  # fmt: skip
