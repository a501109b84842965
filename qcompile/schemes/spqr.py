"""SpQR (Dettmers et al. 2023, arXiv:2306.03078) in the packed layout of transformers' ``SpQRConfig`` and the
``spqr_quant`` kernels: 3-bit weights in 16 x 16 tiles with 3-bit first-order statistics that are themselves
quantized per tile (second order), plus unstructured float16 outliers in CSR and an input permutation.

**Name**: ``spqr-3`` (bits = 3, tile ``beta1 x beta2`` = 16 x 16: the only form the layout holds).

**Geometry** of an ``[N, K]`` weight: ``Np = ceil(N / 16) * 16`` rows and ``Kp = ceil(K / 16) * 16`` columns
(``Kp <= 65536``: columns are 16-bit); padding rows and columns hold code 0 and no outliers. Columns live in the
*permuted* order of ``in_perm``: permuted column ``j`` is input feature ``perm[j]`` (``perm`` a permutation of
``0 .. Kp-1``; features ``>= K`` are padding the activation does not have).

**Dequantization** (``spqr_quant``'s ``dequantize_compressed`` / ``spqr_quantized_matvec``; every step is a float16
operation, rounded to nearest even, as its ``__hsub`` / ``__hmul``). For row ``r``, permuted column ``j``, tile
``(r // 16, j // 16)`` with second-order statistics ``(ss, zs, sz, zz)`` (float16):

    scale = h(ss * h(qs[r, j // 16] - sz))            qs, qz: the row's 3-bit scale and zero codes
    zero  = h(zs * h(qz[r, j // 16] - zz))
    D[r, j] = h(scale * h(q[r, j] - zero))            q: the 3-bit weight code
    W[n, perm[j]] = D[n, j] + sum of the row's outliers at column j       (float16 values, added exactly)

**Packed tensors** (``T = Np / 16`` tile rows, ``G = Kp / 16`` tiles per tile row; ``nnz`` outliers)::

    dense_weights int64 [T * G * 16]  word (t * G + g) * 16 + i: row 16 t + i of tile (t, g), LSB first:
                                        bits 0-2 qs, 3-5 qz, 6 + 3c .. 8 + 3c weight code of column 16 g + c
                                        (c = 0..15), 54-61 byte i // 2 of the tile's 64-bit second-order word, 62-63
                                        zero. The second-order word is four float16 (little-endian bit order):
                                        bits 0-15 ss, 16-31 zs, 32-47 sz, 48-63 zz (rows 2b and 2b+1 both hold byte b)
    row_offsets   int32 [N + 1]       CSR: the outliers of row n are entries row_offsets[n] .. row_offsets[n+1]-1
    col_vals      int32 [nnz]         outlier: bits 16-31 its float16 value, bits 0-15 its permuted column
    in_perm       int32 [Kp / 2]      perm[2i] in bits 0-15, perm[2i+1] in bits 16-31

transformers names the per-layer tensors the same (``<layer>.dense_weights``, ...). Its compressor writes zero words
for the rows of a last, partial tile row, which drops second-order bytes when ``N % 16`` is small; qcompile writes
the bytes in those rows too (its checkpoints are the same for ``N % 16 == 0``). Only CSR outliers are read (the
"ptcsr" variant of ``spqr_quant``, whose ``row_offsets`` has ``N / 16 + 1`` entries, is not).

**Reference quantization** (data-free, :meth:`Spqr.quantize`): identity permutation; padding rows repeat the last
row, padding columns are 0; per tile row min-max 3-bit
``scale = (max - min) / 7``, ``zero = -min / scale``; the 16 scales (and the 16 zeros) of a tile quantized min-max to
3 bits with float16 ``ss = (max - min) / 7``, ``sz = -min / ss``; codes ``clamp(round(w / scale + zero), 0, 7)``
with the dequantized statistics. With ``outlier_threshold = tau`` the elements whose error satisfies
``err**2 > tau * mean_k var(W[:, k])`` (SpQR's sensitivity criterion with an identity Hessian) become outliers: the
statistics are refitted with them replaced by the mean of their group's other weights and the outlier stores
``h(w - D)``. The calibrated algorithm is :mod:`qcompile.algorithms.spqr`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch._guards

from qcompile.schemes.base import PackedWeight, Scheme, TensorSpec, ceil_to
from qcompile.schemes.registry import Family, register_family

BITS = 3
TILE = 16
MAX_CODE = 2**BITS - 1
#: columns are 16-bit in col_vals and in_perm
MAX_COLUMNS = 1 << 16
NAME = "spqr-3"


def h(x: torch.Tensor) -> torch.Tensor:
    """float64 ``x`` rounded to float16 (nearest even), kept in float64."""
    return x.to(torch.float16).to(torch.float64)


@dataclasses.dataclass
class SpqrWeight:
    """Unpacked SpQR weight (module docstring), columns in permuted order.

    ``codes uint8 [Np, Kp]``; ``scale_codes``, ``zero_codes`` ``uint8 [Np, Kp / 16]``; ``second float16 [Np / 16,
    Kp / 16, 4]`` = ``(ss, zs, sz, zz)`` per tile; ``row_offsets int64 [N + 1]``, ``columns int64 [nnz]`` (permuted),
    ``values float16 [nnz]``; ``perm int64 [Kp]``; ``in_features`` / ``out_features`` the true ``K`` / ``N``."""

    codes: torch.Tensor
    scale_codes: torch.Tensor
    zero_codes: torch.Tensor
    second: torch.Tensor
    row_offsets: torch.Tensor
    columns: torch.Tensor
    values: torch.Tensor
    perm: torch.Tensor
    in_features: int
    out_features: int

    @property
    def nnz(self) -> int:
        return int(self.columns.numel())


def dense_values(codes, scale_codes, zero_codes, second) -> torch.Tensor:
    """float64 ``D [Np, Kp]`` (permuted columns) of the dense part, every step rounded to float16."""
    s = second.to(torch.float64)
    ss, zs, sz, zz = (s[..., i].repeat_interleave(TILE, dim=0) for i in range(4))  # [Np, G]
    scale = h(ss * h(scale_codes.to(torch.float64) - sz))
    zero = h(zs * h(zero_codes.to(torch.float64) - zz))
    return h(scale.repeat_interleave(TILE, 1) * h(codes.to(torch.float64) - zero.repeat_interleave(TILE, 1)))


def _second_order(stat: torch.Tensor):
    """3-bit min-max quantization of ``stat [Np, G]`` per 16 rows: ``(codes, scale, zero)`` with float16 ``scale
    [T, G]`` and ``zero [T, G]`` (``scale = range / 7``, or ``|min|`` (1 if 0) when the range is 0)."""
    tiles = stat.reshape(-1, TILE, stat.shape[1])
    lo, hi = tiles.amin(1), tiles.amax(1)
    fallback = torch.where(lo == 0, torch.ones_like(lo), lo.abs())
    scale = h(torch.where(hi > lo, (hi - lo) / MAX_CODE, fallback))
    scale = torch.where(scale == 0, torch.full_like(scale, 2.0**-24), scale)  # a range below float16's resolution
    zero = h(-lo / scale)
    codes = torch.clamp(torch.round(tiles / scale[:, None] + zero[:, None]), 0, MAX_CODE)
    return codes.reshape(stat.shape), scale, zero


def fit_statistics(groups: torch.Tensor):
    """Min-max 3-bit statistics of float64 ``groups [Np, G, 16]`` (16 weights of a tile row each), quantized per
    tile (16 rows): ``(scale_codes, zero_codes [Np, G], second float16 [Np / 16, G, 4], scale, zero [Np, G])``
    with ``scale`` / ``zero`` the dequantized (float16) statistics the codes are rounded with. A group of equal
    weights ``c`` takes ``scale = |c|`` (1 when ``c = 0``), ``zero = -c / scale``."""
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = torch.where(hi > lo, (hi - lo) / MAX_CODE, torch.where(lo == 0, torch.ones_like(lo), lo.abs()))
    zero = -lo / scale
    scale_codes, ss, sz = _second_order(scale)
    zero_codes, zs, zz = _second_order(zero)
    second = torch.stack([ss, zs, sz, zz], dim=-1).to(torch.float16)
    s = second.to(torch.float64)
    scale_hat = h(s[..., 0].repeat_interleave(TILE, 0) * h(scale_codes - s[..., 2].repeat_interleave(TILE, 0)))
    zero_hat = h(s[..., 1].repeat_interleave(TILE, 0) * h(zero_codes - s[..., 3].repeat_interleave(TILE, 0)))
    return scale_codes.to(torch.uint8), zero_codes.to(torch.uint8), second, scale_hat, zero_hat


def round_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``clamp(round(w / scale + zero), 0, 7)`` (broadcasting; a zero scale gives ``round(zero)``), float64."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    ratio = torch.where(scale == 0, torch.zeros_like(w), w / safe)
    return torch.clamp(torch.round(ratio + zero), 0, MAX_CODE)


def code_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``h(scale * h(codes - zero))`` (broadcasting), float64."""
    return h(scale * h(codes - zero))


def fit_tiles(w: torch.Tensor):
    """Round-to-nearest of float64 ``w [Np, Kp]`` (permuted columns): ``(codes, scale_codes, zero_codes, second)``."""
    np_, kp = w.shape
    groups = w.reshape(np_, kp // TILE, TILE)
    scale_codes, zero_codes, second, scale_hat, zero_hat = fit_statistics(groups)
    codes = round_codes(groups, scale_hat[..., None], zero_hat[..., None]).reshape(np_, kp)
    return codes.to(torch.uint8), scale_codes, zero_codes, second


def pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    """``w [N, C]`` with its last row repeated up to ``rows`` rows (padding rows then leave the tile's statistics
    as they are)."""
    n = w.shape[0]
    return w if n == rows else torch.cat([w, w[-1:].expand(rows - n, w.shape[1])])


def csr(mask: torch.Tensor, values: torch.Tensor, rows: int):
    """``(row_offsets int64 [rows + 1], columns int64, values float16)`` of the True entries of ``mask [>= rows, C]``
    (row-major order) taking ``values`` there."""
    mask = mask[:rows]
    counts = mask.sum(1)
    offsets = torch.zeros(rows + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    r, c = mask.nonzero(as_tuple=True)
    return offsets, c.to(torch.int64), values[:rows][r, c].to(torch.float16)


def _wrap32(x: torch.Tensor) -> torch.Tensor:
    """int64 holding an unsigned 32-bit pattern → int32 with those bits."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


@dataclasses.dataclass(frozen=True)
class Spqr(Scheme):
    """SpQR 3-bit, 16 x 16 tiles, float16 CSR outliers, input permutation (module docstring)."""

    version: int = 1
    family = "spqr"

    @property
    def name(self) -> str:
        return NAME

    @classmethod
    def from_name(cls, name):
        if name != "spqr" and not name.startswith("spqr-"):
            return None
        if name != NAME:
            raise ValueError(f"spqr: the packed layout holds 3-bit weights in 16x16 tiles only: {NAME}, got {name!r}")
        return cls()

    # -- geometry -------------------------------------------------------------------------------------------------
    def padded_in_features(self, in_features):
        return ceil_to(in_features, TILE)

    def group_size_for(self, in_features):
        return TILE

    def tensors(self, out_features, in_features):
        kp = self.padded_in_features(in_features)
        if kp > MAX_COLUMNS:
            raise ValueError(f"{NAME}: K={in_features} has more than {MAX_COLUMNS} columns (16-bit column indices)")
        words = ceil_to(out_features, TILE) * kp // TILE
        return (TensorSpec("dense_weights", (words,), torch.int64,
                           "per 16x16 tile and tile row: 3-bit scale and zero codes, 16 3-bit weight codes, a byte of "
                           "the tile's float16 second-order statistics"),
                TensorSpec("row_offsets", (out_features + 1,), torch.int32, "CSR row offsets of the outliers"),
                TensorSpec("col_vals", (0,), torch.int32,
                           "outliers: float16 value in bits 16-31, permuted column in bits 0-15", ((0, "nnz"),)),
                TensorSpec("in_perm", (kp // 2,), torch.int32,
                           "input permutation, two 16-bit feature indices per word (low half first)"))  # fmt: skip

    def bits_per_weight(self, out_features: int, in_features: int, outliers: int = 0) -> float:
        """Dense words, row offsets and permutation, plus 32 bits per outlier."""
        return 8 * (self.packed_nbytes(out_features, in_features) + 4 * outliers) / (out_features * in_features)

    # -- quantization ---------------------------------------------------------------------------------------------
    def quantize(self, weight, outlier_threshold: float | None = None) -> SpqrWeight:
        n, k = weight.shape
        if not torch.isfinite(weight).all():
            raise ValueError(f"{NAME}: the weight [N={n}, K={k}] has non-finite values")
        self.tensors(n, k)  # K within 16-bit columns
        np_, kp = ceil_to(n, TILE), self.padded_in_features(k)
        w = torch.zeros(np_, kp, dtype=torch.float64)
        w[:, :k] = pad_rows(weight.to(torch.float64), np_)
        fitted = fit_tiles(w)
        mask = torch.zeros(np_, kp, dtype=torch.bool)
        if outlier_threshold is not None:
            err = w - dense_values(*fitted)
            scale = weight.to(torch.float64).var(dim=0).mean() if n > 1 else torch.tensor(0.0, dtype=torch.float64)
            mask[:n, :k] = err[:n, :k].square() > float(outlier_threshold) * scale
            if mask.any():
                fitted = fit_tiles(replace_by_group_mean(w, mask))
        residual = h(w - dense_values(*fitted))
        offsets, columns, values = csr(mask, residual, n)
        return SpqrWeight(*fitted, offsets, columns, values, torch.arange(kp), k, n)

    def dequantize(self, q: SpqrWeight) -> torch.Tensor:
        d = dense_values(q.codes, q.scale_codes, q.zero_codes, q.second)
        # the row of each outlier (searchsorted keeps the shape static for tracing, unlike repeat_interleave)
        rows = torch.searchsorted(q.row_offsets, torch.arange(q.nnz), right=True) - 1
        d.index_put_((rows, q.columns), q.values.to(torch.float64), accumulate=True)
        w = torch.empty_like(d)
        w[:, q.perm] = d
        return w[: q.out_features, : q.in_features].to(torch.float32)

    # -- packing --------------------------------------------------------------------------------------------------
    def pack(self, q: SpqrWeight) -> PackedWeight:
        np_, kp = q.codes.shape
        t, g = np_ // TILE, kp // TILE
        codes = q.codes.to(torch.int64).reshape(t, TILE, g, TILE).permute(0, 2, 1, 3)  # [T, G, row, column]
        words = (q.scale_codes.to(torch.int64).reshape(t, TILE, g).permute(0, 2, 1)
                 | q.zero_codes.to(torch.int64).reshape(t, TILE, g).permute(0, 2, 1) << 3)  # fmt: skip
        for c in range(TILE):
            words = words | codes[..., c] << (6 + BITS * c)
        halves = q.second.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF  # [T, G, 4]
        second = halves[..., 0] | halves[..., 1] << 16 | halves[..., 2] << 32 | halves[..., 3] << 48
        shifts = 8 * (torch.arange(TILE) // 2)
        words = words | ((second[..., None] >> shifts) & 0xFF) << 54
        values = q.values.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
        perm = q.perm.to(torch.int64)
        packed = PackedWeight({
            "dense_weights": words.reshape(-1).contiguous(),
            "row_offsets": q.row_offsets.to(torch.int32),
            "col_vals": _wrap32(values << 16 | (q.columns & 0xFFFF)),
            "in_perm": _wrap32(perm[1::2] << 16 | perm[0::2]),
        })  # fmt: skip
        return self.checked_pack(packed, q.out_features, q.in_features)

    def unpack(self, packed: PackedWeight, in_features, out_features: int | None = None) -> SpqrWeight:
        n = packed["row_offsets"].shape[0] - 1 if out_features is None else out_features
        if torch._guards.detect_fake_mode(packed.list()) is None:  # real tensors (not traced): check the data
            validate(packed, n, in_features)
        kp = self.padded_in_features(in_features)
        np_ = ceil_to(n, TILE)
        t, g = np_ // TILE, kp // TILE
        words = packed["dense_weights"].to(torch.int64).reshape(t, g, TILE)
        scale_codes = (words & 7).permute(0, 2, 1).reshape(np_, g)
        zero_codes = (words >> 3 & 7).permute(0, 2, 1).reshape(np_, g)
        shifts = 6 + BITS * torch.arange(TILE)
        codes = (words[..., None] >> shifts & 7).permute(0, 2, 1, 3).reshape(np_, kp)
        second = torch.zeros(t, g, dtype=torch.int64)
        for i in range(TILE):
            second |= (words[..., i] >> 54 & 0xFF) << (8 * (i // 2))
        halves = torch.stack([(second >> (16 * i)) & 0xFFFF for i in range(4)], dim=-1)
        halves = torch.where(halves >= 2**15, halves - 2**16, halves).to(torch.int16).view(torch.float16)
        col_vals = packed["col_vals"].to(torch.int64) & 0xFFFFFFFF
        values = (col_vals >> 16).to(torch.int64)
        values = torch.where(values >= 2**15, values - 2**16, values).to(torch.int16).view(torch.float16)
        return SpqrWeight(codes.to(torch.uint8), scale_codes.to(torch.uint8), zero_codes.to(torch.uint8), halves,
                          packed["row_offsets"].to(torch.int64), col_vals & 0xFFFF, values,
                          permutation(packed["in_perm"]), in_features, n)  # fmt: skip

    def dequantize_packed(self, packed, out_features, in_features):
        if not isinstance(packed, PackedWeight):
            packed = PackedWeight.from_list(self, packed, out_features, in_features)
        return self.dequantize(self.unpack(packed, in_features, out_features))


def replace_by_group_mean(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``w [R, C]`` with the ``mask``-ed entries replaced by the mean of the other entries of their group of 16
    columns (0 when the group has none), as SpQR fits statistics without its outliers."""
    r, c = w.shape
    groups, keep = w.reshape(r, c // TILE, TILE), (~mask).reshape(r, c // TILE, TILE)
    mean = (groups * keep).sum(-1, keepdim=True) / keep.sum(-1, keepdim=True).clamp_min(1)
    return torch.where(keep, groups, mean).reshape(r, c)


def permutation(in_perm: torch.Tensor) -> torch.Tensor:
    """``int64 [Kp]`` from ``in_perm int32 [Kp / 2]`` (two 16-bit indices a word, low half first)."""
    words = in_perm.to(torch.int64) & 0xFFFFFFFF
    return torch.stack([words & 0xFFFF, words >> 16], dim=1).reshape(-1)


def validate(packed: PackedWeight, out_features: int, in_features: int, where: str = NAME) -> None:
    """``ValueError`` naming the tensor when the CSR part or the permutation is inconsistent: ``row_offsets`` not
    starting at 0, decreasing, or not ending at the length of ``col_vals``; an outlier column that is no input feature
    (``perm[column] >= K``); ``in_perm`` not a permutation of ``0 .. Kp-1``."""
    Spqr().check_packed(packed, out_features, in_features, where=where)
    offsets = packed["row_offsets"].to(torch.int64)
    nnz = packed["col_vals"].shape[0]
    if int(offsets[0]) != 0 or bool((torch.diff(offsets) < 0).any()) or int(offsets[-1]) != nnz:
        raise ValueError(f"{where}: row_offsets must rise from 0 to the length of col_vals ({nnz}), got "
                         f"{offsets[0].item()} .. {offsets[-1].item()}"
                         f"{' (decreasing)' if bool((torch.diff(offsets) < 0).any()) else ''}")  # fmt: skip
    kp = Spqr().padded_in_features(in_features)
    perm = permutation(packed["in_perm"])
    if not torch.equal(torch.sort(perm).values, torch.arange(kp)):
        raise ValueError(f"{where}: in_perm is not a permutation of 0 .. {kp - 1}")
    columns = packed["col_vals"].to(torch.int64) & 0xFFFF
    bad = columns >= kp
    if not bad.any() and nnz:
        bad = perm[columns] >= in_features
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"{where}: col_vals[{first}] has column {int(columns[first])}, which is no input feature "
                         f"(K={in_features}, Kp={kp}, in_perm maps it to "
                         f"{int(perm[columns[first]]) if columns[first] < kp else 'nothing'})")  # fmt: skip


register_family(Family(
    "spqr", Spqr, examples=("spqr-3",), algorithms=("spqr",),
    kernels=("qcompile.codegen.cpp.spqr", "qcompile.codegen.triton.spqr"), onnx=None,
))  # fmt: skip
