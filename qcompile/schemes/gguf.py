"""GGUF / llama.cpp block formats as qcompile schemes: ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``, ``q8_0``, ``q2_k``,
``q3_k``, ``q4_k``, ``q5_k``, ``q6_k``, ``iq4_nl``, ``iq4_xs`` (the lower-case ggml type names), one family ``gguf``.

Each scheme has exactly one packed tensor, ``blocks uint8 [N, (K_padded / QK) * BLOCK_BYTES]``: ggml's block bytes
unchanged, row by row, exactly as they sit in a GGUF file for a row-major ``[N, K]`` tensor (a GGUF tensor of ggml
shape ``[K, N]``). ``K_padded`` is ``K`` rounded up to the block size ``QK``; padding columns are quantized zeros and
meet no activation. Byte layouts, element order and formulas, one section per type:
:mod:`qcompile.schemes.gguf_blocks`.

| scheme | id | QK  | bytes | bpw    | fields in byte order                              | w                          |
|--------|----|-----|-------|--------|---------------------------------------------------|----------------------------|
| q4_0   | 2  | 32  | 18    | 4.5    | d f16, qs u8[16]                                  | d*(q-8)                    |
| q4_1   | 3  | 32  | 20    | 5.0    | d f16, m f16, qs u8[16]                           | d*q + m                    |
| q5_0   | 6  | 32  | 22    | 5.5    | d f16, qh u8[4], qs u8[16]                        | d*(q-16)                   |
| q5_1   | 7  | 32  | 24    | 6.0    | d f16, m f16, qh u8[4], qs u8[16]                 | d*q + m                    |
| q8_0   | 8  | 32  | 34    | 8.5    | d f16, qs i8[32]                                  | q*d                        |
| q2_k   | 10 | 256 | 84    | 2.625  | scales u8[16], qs u8[64], d f16, dmin f16         | (d*sc)*q - dmin*m, /16     |
| q3_k   | 11 | 256 | 110   | 3.4375 | hmask u8[32], qs u8[64], scales u8[12], d f16     | (d*(sc-32))*(q-4), /16     |
| q4_k   | 12 | 256 | 144   | 4.5    | d f16, dmin f16, scales u8[12], qs u8[128]        | (d*sc)*q - dmin*m, /32     |
| q5_k   | 13 | 256 | 176   | 5.5    | d, dmin f16, scales u8[12], qh u8[32], qs u8[128] | (d*sc)*q - dmin*m, /32     |
| q6_k   | 14 | 256 | 210   | 6.5625 | ql u8[128], qh u8[64], scales i8[16], d f16       | (d*sc)*(q-32), /16         |
| iq4_nl | 20 | 32  | 18    | 4.5    | d f16, qs u8[16]                                  | d*KVALUES[q]               |
| iq4_xs | 23 | 256 | 136   | 4.25   | d f16, scales_h u16, scales_l u8[4], qs u8[128]   | (d*(ls-32))*KVALUES[q] /32 |

(``id``: ggml type id; ``bpw``: bits per weight; ``/16``, ``/32``: one sub-block scale per 16 or 32 elements.)
The unpacked form, :class:`GGUFWeight`, holds the decoded fields (``d``, ``dmin``, ``sc``, ``m``, per-element codes
``q``) of the ``N * K_padded / QK`` blocks in row order. Quantizers: llama.cpp's reference rules
(:mod:`qcompile.schemes.gguf_quantize`): the legacy types give bytes identical to ``gguf.quants.quantize``. GPTQ
writes these grids through :meth:`GGUFScheme.column_grid`: the scales and mins of round-to-nearest stay, GPTQ
chooses the codes. AutoRound learns the legacy types' codes and clipped block ranges on
:meth:`GGUFScheme.affine_block_grid`. The reference matmul dequantizes, then ``F.linear``.
"""

from __future__ import annotations

import dataclasses

import torch

from qcompile.schemes import gguf_blocks
from qcompile.schemes.base import PackedWeight, Scheme, TensorSpec, ceil_to, pad_columns
from qcompile.schemes.gguf_blocks import BLOCK_TYPES, KVALUES, BlockType
from qcompile.schemes.gguf_quantize import quantize_blocks
from qcompile.schemes.registry import Family, register_family

#: block types whose codes index a level table instead of an affine grid
_TABLE_TYPES = ("iq4_nl", "iq4_xs")
#: the legacy types as affine block grids (:class:`AffineBlockGrid`): rule, offset code, largest code
_AFFINE = {"q4_0": ("peak", 8, 15), "q5_0": ("peak", 16, 31), "q4_1": ("range", 0, 15), "q5_1": ("range", 0, 31),
           "q8_0": ("absmax", 0, 127)}  # fmt: skip


@dataclasses.dataclass
class GGUFWeight:
    """Unpacked GGUF blocks of an ``[N, K]`` weight: ``fields`` as :mod:`qcompile.schemes.gguf_blocks` decodes them,
    leading dimension ``N * K_padded / QK`` (row ``n``'s blocks are ``n * nb .. n * nb + nb - 1``); ``fields["q"]``
    is ``[R, QK]``, element order ggml's."""

    qtype: str
    fields: dict
    out_features: int
    in_features: int


@dataclasses.dataclass(frozen=True)
class GGUFScheme(Scheme):
    """One ggml block type as a weight-only scheme; ``qtype`` is the lower-case ggml type name."""

    qtype: str = "q4_k"
    family = "gguf"

    def __post_init__(self):
        if self.qtype not in BLOCK_TYPES:
            raise ValueError(f"unknown GGUF type {self.qtype!r}; known: {', '.join(BLOCK_TYPES)}")

    @property
    def name(self) -> str:
        return self.qtype

    @classmethod
    def from_name(cls, name: str):
        return cls(name) if name in BLOCK_TYPES else None

    @property
    def kind(self) -> BlockType:
        return BLOCK_TYPES[self.qtype]

    # -- geometry -------------------------------------------------------------------------------
    def padded_in_features(self, in_features: int) -> int:
        return ceil_to(in_features, self.kind.qk)

    def group_size_for(self, in_features: int) -> int:
        return self.kind.qk

    def tensors(self, out_features: int, in_features: int):
        kind = self.kind
        row = self.padded_in_features(in_features) // kind.qk * kind.nbytes
        fields = ", ".join(f"{name} [{size}]" for name, size in kind.layout)
        doc = (f"ggml {kind.name.upper()} blocks ({kind.nbytes} bytes per {kind.qk} elements: {fields}), row-major "
               f"as in a GGUF file; element order in qcompile.schemes.gguf_blocks")
        return (TensorSpec("blocks", (out_features, row), torch.uint8, doc),)

    # -- reference quantization -------------------------------------------------------------------
    def quantize(self, weight: torch.Tensor) -> GGUFWeight:
        if weight.dim() != 2:
            raise ValueError(f"{self.name}: expected a 2-D [N, K] weight, got shape {list(weight.shape)}")
        n, k = weight.shape
        padded = pad_columns(weight.detach().to(torch.float32).cpu(), self.padded_in_features(k))
        fields = quantize_blocks(self.qtype, padded.reshape(-1, self.kind.qk))
        return GGUFWeight(self.qtype, fields, n, k)

    def dequantize(self, q: GGUFWeight) -> torch.Tensor:
        values = self.kind.values(q.fields).reshape(q.out_features, -1)
        return values[:, : q.in_features]

    def pack(self, q: GGUFWeight) -> PackedWeight:
        blocks = self.kind.encode(q.fields).reshape(q.out_features, -1).contiguous()
        return self.checked_pack(PackedWeight({"blocks": blocks}), q.out_features, q.in_features)

    def unpack(self, packed: PackedWeight, in_features: int) -> GGUFWeight:
        blocks = packed["blocks"]
        fields = self.kind.decode(gguf_blocks.as_blocks(blocks.cpu(), self.kind))
        return GGUFWeight(self.qtype, fields, blocks.shape[0], in_features)

    def dequantize_packed(self, packed, out_features: int, in_features: int) -> torch.Tensor:
        if not isinstance(packed, PackedWeight):
            packed = PackedWeight.from_list(self, packed, out_features, in_features)
        blocks = packed["blocks"]
        values = gguf_blocks.dequantize(blocks.cpu(), self.kind).to(blocks.device)
        return values[:, :in_features]

    # -- calibration --------------------------------------------------------------------------------
    def column_grid(self, weight: torch.Tensor) -> GGUFColumnGrid:
        """The static per-column grid GPTQ writes codes into (see :mod:`qcompile.algorithms.grid`)."""
        return GGUFColumnGrid(self, weight)

    def affine_block_grid(self, algorithm: str) -> AffineBlockGrid:
        """The legacy type as an affine grid on blocks of 32 for ``algorithm`` (one that learns scales and codes);
        an error naming the type for K-quants and IQ4 types."""
        if self.qtype not in _AFFINE:
            raise ValueError(f"algorithm {algorithm!r} writes the legacy GGUF types ({', '.join(_AFFINE)}) only; "
                             f"{self.qtype!r} is a K-quant or IQ4 type: use 'gptq', 'awq' or 'rtn' for it")
        return AffineBlockGrid(self, *_AFFINE[self.qtype])


class GGUFColumnGrid:
    """Round-to-nearest blocks of ``weight [N, K]`` whose scales and mins stay fixed while GPTQ picks each column's
    codes: affine types place code ``u`` at ``a * u + b``; IQ4 types at ``s * KVALUES[u]``.

    ``quantize_column(index, values [N]) -> [N]`` rounds column ``index`` (original order, ``< K_padded``) to its
    grid and records the codes; ``finish()`` returns the :class:`GGUFWeight`."""

    def __init__(self, scheme: GGUFScheme, weight: torch.Tensor):
        self.scheme = scheme
        self.base = scheme.quantize(weight)
        kind, fields = scheme.kind, self.base.fields
        n = self.base.out_features
        self.padded_in_features = scheme.padded_in_features(self.base.in_features)
        self.code_dtype = fields["q"].dtype
        self.codes = fields["q"].reshape(n, -1).t().to(torch.float32).contiguous()  # [Kp, N]
        self.lo, self.hi = kind.lo, kind.hi
        self.table = scheme.qtype in _TABLE_TYPES

        def at(code: int) -> torch.Tensor:  # every element's value for one code, [Kp, N]
            probe = dict(fields, q=torch.full_like(fields["q"], code))
            return kind.values(probe).reshape(n, -1).t().contiguous()

        if self.table:
            self.scale = at(KVALUES.index(1))  # s * 1
            self.levels = torch.tensor(KVALUES, dtype=torch.float32)
        else:
            self.offset = at(0)
            self.scale = at(1) - self.offset
            nonzero = self.scale != 0
            self.inverse = torch.where(nonzero, 1 / torch.where(nonzero, self.scale, torch.ones_like(self.scale)),
                                       torch.zeros_like(self.scale))  # fmt: skip

    def quantize_column(self, index: int, values: torch.Tensor) -> torch.Tensor:
        if self.table:
            levels = self.scale[index].unsqueeze(1) * self.levels
            codes = (values.unsqueeze(1) - levels).abs().argmin(1)
            self.codes[index] = codes.to(torch.float32)
            return levels.gather(1, codes.unsqueeze(1)).squeeze(1)
        codes = torch.clamp(torch.round((values - self.offset[index]) * self.inverse[index]), self.lo, self.hi)
        self.codes[index] = codes
        return codes * self.scale[index] + self.offset[index]

    def finish(self) -> GGUFWeight:
        q = self.codes.t().reshape(self.base.fields["q"].shape).to(self.code_dtype)
        return dataclasses.replace(self.base, fields=dict(self.base.fields, q=q.contiguous()))


@dataclasses.dataclass(frozen=True)
class AffineBlockGrid:
    """A legacy type's grid, as :func:`qcompile.schemes.gguf_quantize.quantize_legacy` fills it, for blocks
    ``x [R, 32]`` (``d``, ``m`` float16 per block):

    * ``peak`` (q4_0, q5_0): ``d = max / -offset`` (``max`` the signed value of largest ``|x|``), ``q = trunc(x/d +
      offset + 0.5)`` in ``0 .. hi``, ``w = d * (q - offset)``;
    * ``range`` (q4_1, q5_1): ``d = (max(x) - min(x)) / hi``, ``m = min(x)``, ``q = trunc((x - m)/d + 0.5)`` in
      ``0 .. hi``, ``w = d * q + m``;
    * ``absmax`` (q8_0): ``d = max|x| / hi``, ``q = roundf(x/d)`` in ``-hi .. hi``, ``w = q * d``.

    ``weight(q [R, 32], d [R], m [R] | None, out_features, in_features)`` is the scheme's unpacked form of those
    fields (blocks in row order, ``R = out_features * K_padded / 32``)."""

    scheme: GGUFScheme
    rule: str
    offset: int
    hi: int

    @property
    def qk(self) -> int:
        return self.scheme.kind.qk

    def weight(self, q: torch.Tensor, d: torch.Tensor, m, out_features: int, in_features: int) -> GGUFWeight:
        rows = out_features * self.scheme.padded_in_features(in_features) // self.qk
        if tuple(q.shape) != (rows, self.qk) or d.numel() != rows or (m is not None and m.numel() != rows):
            raise ValueError(f"{self.scheme.name}: expected codes [{rows}, {self.qk}] and {rows} scales for an "
                             f"[{out_features}, {in_features}] weight, got codes {list(q.shape)}, {d.numel()} scales")
        codes = q.to(torch.int8 if self.rule == "absmax" else torch.uint8).contiguous()  # as the blocks decode
        fields = {"d": d.reshape(-1).to(torch.float16), "q": codes}
        if self.rule == "range":
            fields["m"] = m.reshape(-1).to(torch.float16)
        return GGUFWeight(self.scheme.qtype, fields, out_features, in_features)


register_family(Family(
    "gguf", GGUFScheme,
    examples=("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "iq4_nl", "iq4_xs", "q6_k"),
    algorithms=("gptq", "awq", "autoround"),
    kernels=("qcompile.codegen.cpp.gguf", "qcompile.codegen.triton.gguf"),
    onnx=None,
))  # fmt: skip
