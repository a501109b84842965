"""VPTQ, vector post-training quantization (Liu et al. 2024, arXiv:2409.17066; ``vptq`` package ``layers/vqlinear.py``,
``ops/quant_gemm.py: dequant``, ``utils/pack.py``): vectors of ``v`` weights running along the **output** dimension
are replaced by the nearest of ``Kc`` centroids (plus, optionally, the nearest of ``Kr`` residual centroids); the
first ``o`` input columns (after the permutation) may use an outlier codebook of their own.

**Names**: ``vptq-v<v>-k<Kc>[-r<Kr>][-o<o>]``: vector length ``v`` (1..32), ``Kc`` main centroids (a power of two,
2..65536), optional ``Kr`` residual centroids (a power of two, 2..Kc), optional ``o`` outlier columns whose codebook
has the main one's ``v`` and ``Kc``. Examples: ``vptq-v8-k256``, ``vptq-v4-k64-r16-o8``, ``vptq-v1-k16``; a VPTQ
release such as v8-k65536-256 is ``vptq-v8-k65536-r256``. One group (VPTQ's ``group_num`` 1).

**Packed tensors**: VPTQ's own tensors and bit layout with the group axis (``group_num`` = 1) dropped and the
codebooks as ``[entries, v]`` (an importer reshapes, no code changes). ``N`` out, ``K`` in, ``R = ceil(N / v)``
vector rows (rows ``N .. R*v`` are padding), ``gs = K - o`` main columns, ``bk = log2 Kc``, ``br = log2 Kr`` (0
without residual), ``tb = bk + br``, ``Wd = ceil(gs * tb / 32)``::

    indices            int32   [R, Wd]    per vector row a little-endian bitstream: main column c's tb-bit entry
                                          (main index in the low bk bits, residual index above) starts at bit c*tb;
                                          bit p is bit p % 32 of word p // 32 (words read as uint32)
    centroids          float16 [Kc, v]    main codebook
    res_centroids      float16 [Kr, v]    residual codebook (only with -r)
    outlier_indices    int16   [R, o]     outlier column j's index (read as uint16; only with -o)
    outlier_centroids  float16 [Kc, v]    outlier codebook (only with -o)
    weight_scale       float16 [K]        per input column (original order)
    weight_bias        float16 [K]        per input column (original order)
    perm               int16   [K]        act-order permutation (read as uint16): quantized column j is column perm[j]

    Q[i*v + u, o + c] = centroids[idx(i, c), u] + res_centroids[ridx(i, c), u]      (u < v, c < gs)
    Q[i*v + u, j]     = outlier_centroids[outlier_indices[i, j], u]                   (j < o)
    W[n, perm[j]]     = Q[n, j] * weight_scale[perm[j]] + weight_bias[perm[j]]        (float32, n < N)

so ``y = x @ W.T = (x[:, perm] * s[perm]) @ Q[:N].T + x @ weight_bias`` (the bias term is one scalar per token).

**Bits per weight**: the packed tensors' bytes: ``tb / v`` for the indices (v8-k65536-r256: 3) plus ``16 o / v`` per
outlier column, the codebooks (``16 (2 Kc + Kr) v`` bits, independent of the layer) and 48 bits per input column
for scale, bias and permutation.

**Data-free quantization** (:meth:`Vptq.quantize`, what ``rtn`` writes): per input column ``weight_bias`` = the mean
and ``weight_scale`` = the standard deviation over the outputs (float16; 1 where it is 0), identity permutation;
the normalised vectors are clustered by k-means weighted by ``weight_scale²`` (the error they make in ``W``;
``KMEANS_ITERS`` Lloyd iterations from seeded distinct points), the residual codebook by weighted k-means of what the
main one leaves; codebooks rounded to float16, indices re-chosen for the rounded entries. Seed 0: deterministic. The
calibrated algorithm is ``vptq`` (:mod:`qcompile.algorithms.vptq`).
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch

from qcompile.schemes import aqlm_codebooks as cb
from qcompile.schemes.base import PackedWeight, Scheme, TensorSpec, describe
from qcompile.schemes.registry import Family, register_family

NAME = re.compile(r"vptq-v(?P<v>\d+)-k(?P<k>\d+)(?:-r(?P<r>\d+))?(?:-o(?P<o>\d+))?")
MAX_VECTOR = 32
MAX_CENTROIDS = 65536
KMEANS_ITERS = 10
FLOAT16_MAX = 65504.0


def _power_of_two(value: int) -> bool:
    return value >= 2 and value & (value - 1) == 0


@dataclasses.dataclass
class VptqWeight:
    """Unpacked VPTQ weight: ``codes int64 [R, gs]``, ``res_codes int64 [R, gs]`` or ``None``, ``outlier_codes
    int64 [R, o]`` or ``None``, codebooks float16 ``centroids [Kc, v]``, ``res_centroids [Kr, v]`` / ``None``,
    ``outlier_centroids [Kc, v]`` / ``None``, ``scale`` / ``bias`` float16 ``[K]``, ``perm int64 [K]``,
    ``out_features`` N, ``in_features`` K."""

    codes: torch.Tensor
    res_codes: torch.Tensor | None
    outlier_codes: torch.Tensor | None
    centroids: torch.Tensor
    res_centroids: torch.Tensor | None
    outlier_centroids: torch.Tensor | None
    scale: torch.Tensor
    bias: torch.Tensor
    perm: torch.Tensor
    out_features: int
    in_features: int


# -- bitstream (VPTQ's pack_index / unpack_index_tensor order) --------------------------------------------------------
def pack_bits(entries: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 ``[R, C]`` entries (``< 2**bits``) → int32 ``[R, ceil(C*bits/32)]`` words (module docstring order)."""
    r, c = entries.shape
    words = math.ceil(c * bits / 32)
    stream = ((entries.unsqueeze(-1) >> torch.arange(bits)) & 1).reshape(r, c * bits)
    stream = torch.nn.functional.pad(stream, (0, words * 32 - c * bits)).reshape(r, words, 32)
    value = (stream << torch.arange(32)).sum(-1)
    return torch.where(value >= 2**31, value - 2**32, value).to(torch.int32)


def unpack_bits(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int32 ``[R, Wd]`` → int64 ``[R, count]`` entries of ``bits`` bits."""
    r = words.shape[0]
    value = words.to(torch.int64) & 0xFFFFFFFF
    stream = ((value.unsqueeze(-1) >> torch.arange(32)) & 1).reshape(r, -1)[:, : count * bits]
    return (stream.reshape(r, count, bits) << torch.arange(bits)).sum(-1)


# -- weighted k-means -------------------------------------------------------------------------------------------------
def weighted_kmeans(points: torch.Tensor, weights: torch.Tensor, size: int, iters: int,
                    generator: torch.Generator) -> torch.Tensor:  # fmt: skip
    """``[size, d]`` entries by Lloyd's k-means on ``points [P, d]`` with per-point ``weights [P]`` (>= 0): start from
    ``size`` distinct points drawn with ``generator``, each entry the weighted mean of its points (kept when they
    weigh nothing); with ``P <= size`` each point is its own entry (the rest zero)."""
    p, d = points.shape
    if p <= size:
        out = torch.zeros(size, d, dtype=points.dtype)
        out[:p] = points
        return out
    entries = points[torch.randperm(p, generator=generator)[:size]].clone()
    for _ in range(iters):
        assign = cb.nearest(points, entries)
        sums = torch.zeros_like(entries).index_add_(0, assign, points * weights[:, None])
        mass = torch.zeros(size, dtype=points.dtype).index_add_(0, assign, weights)
        used = mass > 0
        entries[used] = sums[used] / mass[used, None]
    return entries


@dataclasses.dataclass(frozen=True)
class Vptq(Scheme):
    """Vector length ``vector_len`` along N, ``centroids`` main entries, ``res_centroids`` residual entries (0:
    none), ``outliers`` outlier columns (0: none)."""

    vector_len: int = 8
    centroids: int = 4096
    res_centroids: int = 0
    outliers: int = 0
    family = "vptq"

    def __post_init__(self):
        if not 1 <= self.vector_len <= MAX_VECTOR:
            raise ValueError(f"vptq: the vector length must be 1..{MAX_VECTOR}, got {self.vector_len}")
        if not _power_of_two(self.centroids) or self.centroids > MAX_CENTROIDS:
            raise ValueError(f"vptq: the centroid count must be a power of two in 2..{MAX_CENTROIDS}, "
                             f"got {self.centroids}")  # fmt: skip
        if self.res_centroids and (not _power_of_two(self.res_centroids) or self.res_centroids > self.centroids):
            raise ValueError(f"vptq: the residual centroid count must be a power of two in 2..{self.centroids} (the "
                             f"main count: VPTQ's unpacking masks the residual index with the main index width), "
                             f"got {self.res_centroids}")  # fmt: skip
        if self.outliers < 0:
            raise ValueError(f"vptq: the outlier column count must be >= 0, got {self.outliers}")

    # -- names ----------------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        res = f"-r{self.res_centroids}" if self.res_centroids else ""
        out = f"-o{self.outliers}" if self.outliers else ""
        return f"vptq-v{self.vector_len}-k{self.centroids}{res}{out}"

    @classmethod
    def from_name(cls, name):
        if name != "vptq" and not name.startswith("vptq-"):
            return None
        match = NAME.fullmatch(name)
        if match is None or (match["r"] and int(match["r"]) == 0) or (match["o"] and int(match["o"]) == 0):
            raise ValueError("malformed vptq name; the form is vptq-v<v>-k<Kc>[-r<Kr>][-o<o>]: vector length v "
                             "(1..32) along the outputs, Kc centroids (power of two, 2..65536), Kr residual "
                             "centroids (power of two, 2..Kc), o outlier columns, e.g. vptq-v8-k256, "
                             "vptq-v8-k65536-r256, vptq-v4-k64-r16-o8")  # fmt: skip
        return cls(int(match["v"]), int(match["k"]), int(match["r"] or 0), int(match["o"] or 0))

    # -- geometry -------------------------------------------------------------------------------------------------
    @property
    def index_bits(self) -> int:
        return self.centroids.bit_length() - 1

    @property
    def res_bits(self) -> int:
        return self.res_centroids.bit_length() - 1 if self.res_centroids else 0

    @property
    def total_bits(self) -> int:
        return self.index_bits + self.res_bits

    def padded_in_features(self, in_features):
        return in_features

    def group_size_for(self, in_features):
        return in_features

    def vector_rows(self, out_features: int) -> int:
        return -(-out_features // self.vector_len)

    def main_columns(self, in_features: int) -> int:
        """``gs = K - o`` (VPTQ's ``group_size``); refused unless >= 1."""
        if in_features <= self.outliers:
            raise ValueError(f"{self.name}: K={in_features} input columns leave none after the {self.outliers} "
                             f"outlier columns")  # fmt: skip
        return in_features - self.outliers

    def index_words(self, in_features: int) -> int:
        return math.ceil(self.main_columns(in_features) * self.total_bits / 32)

    def tensors(self, out_features, in_features):
        r, v, k = self.vector_rows(out_features), self.vector_len, in_features
        specs = [TensorSpec("indices", (r, self.index_words(k)), torch.int32,
                            f"per vector row, {self.main_columns(k)} entries of {self.total_bits} bits (main index "
                            f"low, residual high) as a little-endian bitstream of uint32 words"),
                 TensorSpec("centroids", (self.centroids, v), torch.float16, f"{self.centroids} main centroids")]
        if self.res_centroids:
            specs.append(TensorSpec("res_centroids", (self.res_centroids, v), torch.float16,
                                    f"{self.res_centroids} residual centroids"))  # fmt: skip
        if self.outliers:
            specs += [TensorSpec("outlier_indices", (r, self.outliers), torch.int16,
                                 "outlier column j's centroid of vector row i (uint16 bits)"),
                      TensorSpec("outlier_centroids", (self.centroids, v), torch.float16,
                                 f"{self.centroids} outlier centroids")]  # fmt: skip
        specs += [TensorSpec("weight_scale", (k,), torch.float16, "per input column scale (original order)"),
                  TensorSpec("weight_bias", (k,), torch.float16, "per input column offset (original order)"),
                  TensorSpec("perm", (k,), torch.int16, "quantized column j is input column perm[j] (uint16 bits)")]
        return tuple(specs)  # fmt: skip

    # -- quantization ---------------------------------------------------------------------------------------------
    def normalisation(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float16 ``(scale [K], bias [K])``: per input column the standard deviation (1 where 0) and the mean."""
        w = weight.to(torch.float64)
        bias = w.mean(0).clamp(-FLOAT16_MAX, FLOAT16_MAX).to(torch.float16)
        std = (w - bias.double()).pow(2).mean(0).sqrt().clamp(max=FLOAT16_MAX).to(torch.float16)
        return torch.where(std > 0, std, torch.ones_like(std)), bias

    def vectors(self, q: torch.Tensor, columns: slice) -> torch.Tensor:
        """float32 ``[R * C, v]``: the vectors of ``q [R*v, K]`` in ``columns`` (vector row major)."""
        r = q.shape[0] // self.vector_len
        block = q[:, columns].reshape(r, self.vector_len, -1)
        return block.permute(0, 2, 1).reshape(-1, self.vector_len)

    def prepare(self, weight: torch.Tensor, importance: torch.Tensor | None = None):
        """``(q [R*v, K] float32, scale, bias, perm int64 [K], column_weights [K])``: the normalised weight in
        quantization order (rows past N zero), float16 scale / bias, the permutation (descending ``importance``,
        identity without) and the k-means weight of each quantized column (``importance * scale²``)."""
        n, k = weight.shape
        if not torch.isfinite(weight).all():
            raise ValueError(f"{self.name}: the weight [N={n}, K={k}] has non-finite values")
        self.main_columns(k)
        if k > 65536:
            raise ValueError(f"{self.name}: K={k} input columns; VPTQ's int16 permutation holds at most 65536")
        scale, bias = self.normalisation(weight)
        imp = torch.ones(k, dtype=torch.float64) if importance is None else importance.to(torch.float64)
        perm = torch.arange(k) if importance is None else torch.argsort(imp, descending=True, stable=True)
        normal = (weight.to(torch.float64) - bias.double()) / scale.double()
        q = torch.zeros(self.vector_rows(n) * self.vector_len, k)
        q[:n] = normal[:, perm].to(torch.float32)
        return q, scale, bias, perm, (imp * scale.double() ** 2)[perm].to(torch.float32)

    def codebooks(self, q: torch.Tensor, column_weights: torch.Tensor, seed: int = 0, iters: int = KMEANS_ITERS):
        """float32 ``(centroids, res_centroids or None, outlier_centroids or None)`` by weighted k-means."""
        generator = torch.Generator().manual_seed(seed)
        o, r = self.outliers, q.shape[0] // self.vector_len
        points = self.vectors(q, slice(o, None))
        weights = column_weights[o:].repeat(r)
        main = weighted_kmeans(points, weights, self.centroids, iters, generator)
        res = None
        if self.res_centroids:
            left = points - main[cb.nearest(points, main)]
            res = weighted_kmeans(left, weights, self.res_centroids, iters, generator)
        out = None
        if o:
            out = weighted_kmeans(self.vectors(q, slice(0, o)), column_weights[:o].repeat(r), self.centroids, iters,
                                  generator)  # fmt: skip
        return main, res, out

    @staticmethod
    def half(book: torch.Tensor | None) -> torch.Tensor | None:
        return None if book is None else book.clamp(-FLOAT16_MAX, FLOAT16_MAX).to(torch.float16)

    def assign(self, points: torch.Tensor, main: torch.Tensor, res: torch.Tensor | None):
        """``(codes [P], res_codes [P] or None, decoded [P, v])``: nearest main entry, then nearest residual entry
        to what it leaves."""
        codes = cb.nearest(points, main)
        decoded = main[codes]
        if res is None:
            return codes, None, decoded
        res_codes = cb.nearest(points - decoded, res)
        return codes, res_codes, decoded + res[res_codes]

    def quantize(self, weight, seed: int = 0):
        """Data-free: weighted k-means of the normalised vectors (module docstring)."""
        q, scale, bias, perm, column_weights = self.prepare(weight)
        books = [self.half(b) for b in self.codebooks(q, column_weights, seed)]
        main, res, out = (None if b is None else b.to(torch.float32) for b in books)
        r, o = q.shape[0] // self.vector_len, self.outliers
        codes, res_codes, _ = self.assign(self.vectors(q, slice(o, None)), main, res)
        outlier_codes = cb.nearest(self.vectors(q, slice(0, o)), out).reshape(r, o) if o else None
        return VptqWeight(codes.reshape(r, -1), None if res_codes is None else res_codes.reshape(r, -1),
                          outlier_codes, books[0], books[1], books[2], scale, bias, perm, *weight.shape)  # fmt: skip

    # -- decoding -------------------------------------------------------------------------------------------------
    def decode_columns(self, codes: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
        """float32 ``[R*v, C]`` from ``codes [R, C]`` into ``book [E, v]``."""
        r, c = codes.shape
        return book.to(torch.float32)[codes].permute(0, 2, 1).reshape(r * self.vector_len, c)

    def quantized_columns(self, q: VptqWeight) -> torch.Tensor:
        """float32 ``Q [N, K]`` in quantization order (before permutation and normalisation)."""
        main = self.decode_columns(q.codes, q.centroids)
        if q.res_codes is not None:
            main = main + self.decode_columns(q.res_codes, q.res_centroids)
        if q.outlier_codes is not None:
            main = torch.cat([self.decode_columns(q.outlier_codes, q.outlier_centroids), main], 1)
        return main[: q.out_features]

    def dequantize(self, q):
        w = torch.empty(q.out_features, q.in_features)
        w[:, q.perm] = self.quantized_columns(q)
        return w * q.scale.to(torch.float32) + q.bias.to(torch.float32)

    def pack(self, q):
        entries = q.codes if q.res_codes is None else q.codes | (q.res_codes << self.index_bits)
        tensors = {"indices": pack_bits(entries, self.total_bits), "centroids": q.centroids.contiguous()}
        if self.res_centroids:
            tensors["res_centroids"] = q.res_centroids.contiguous()
        if self.outliers:
            codes = q.outlier_codes
            tensors["outlier_indices"] = torch.where(codes >= 2**15, codes - 2**16, codes).to(torch.int16)
            tensors["outlier_centroids"] = q.outlier_centroids.contiguous()
        perm = torch.where(q.perm >= 2**15, q.perm - 2**16, q.perm).to(torch.int16)
        tensors.update(weight_scale=q.scale.contiguous(), weight_bias=q.bias.contiguous(), perm=perm)
        return self.checked_pack(PackedWeight(tensors), q.out_features, q.in_features)

    def out_features_of(self, packed: PackedWeight) -> int:
        return packed["indices"].shape[0] * self.vector_len

    def unpack(self, packed: PackedWeight, in_features, out_features: int | None = None):
        """Inverse of :meth:`pack` (``out_features`` defaults to ``R * v``: padding rows included). Reads no values
        to check them (the op traces it): :meth:`check_values` refuses a bad permutation or outlier index."""
        words = packed["indices"]
        if words.dtype != torch.int32 or words.dim() != 2:
            raise ValueError(f"{self.name}: indices is {describe(words)}, expected int32[R, Wd]")
        entries = unpack_bits(words, self.total_bits, self.main_columns(in_features))
        codes = entries & (self.centroids - 1)
        res_codes = (entries >> self.index_bits) & (self.res_centroids - 1) if self.res_centroids else None
        perm = packed["perm"].to(torch.int64) & 0xFFFF
        outlier_codes = packed["outlier_indices"].to(torch.int64) & 0xFFFF if self.outliers else None
        n = out_features if out_features is not None else self.out_features_of(packed)
        return VptqWeight(codes, res_codes, outlier_codes, packed["centroids"], packed.get("res_centroids"),
                          packed.get("outlier_centroids"), packed["weight_scale"], packed["weight_bias"], perm, n,
                          in_features)  # fmt: skip

    def check_values(self, packed: PackedWeight, in_features: int, where: str = "layer") -> None:
        """Raise ``ValueError`` naming the tensor when ``perm`` is no permutation of ``0 .. K-1`` or an outlier index
        is past the outlier codebook (the kernels would read such entries as zero / modulo the codebook)."""
        perm = packed["perm"].to(torch.int64) & 0xFFFF
        if perm.shape != (in_features,) or not torch.equal(torch.sort(perm).values, torch.arange(in_features)):
            raise ValueError(f"{where}.perm: not a permutation of 0..{in_features - 1} ({self.name})")
        if self.outliers:
            codes = packed["outlier_indices"].to(torch.int64) & 0xFFFF
            if codes.numel() and int(codes.max()) >= self.centroids:
                raise ValueError(f"{where}.outlier_indices: holds {int(codes.max())}, past the {self.centroids} "
                                 f"outlier centroids ({self.name})")  # fmt: skip

    def dequantize_packed(self, packed, out_features, in_features):
        if not isinstance(packed, PackedWeight):
            packed = PackedWeight.from_list(self, packed, out_features, in_features)
        return self.dequantize(self.unpack(packed, in_features, out_features))


register_family(Family(
    "vptq", Vptq, examples=("vptq-v8-k256", "vptq-v4-k64-r16-o8", "vptq-v1-k16"), algorithms=("vptq",),
    kernels=("qcompile.codegen.cpp.vptq", "qcompile.codegen.triton.vptq"),
))  # fmt: skip
