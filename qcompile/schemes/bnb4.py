"""bitsandbytes' 4-bit layout exactly (``Linear4bit``, ``quantize_4bit``): ``bnb-nf4``, ``bnb-nf4-dq``, ``bnb-fp4``,
``bnb-fp4-dq``, each optionally ``-b<B>`` for a blocksize other than 64 (32, 128, 256, ... 4096).

Blocks of ``B`` run over the **flattened** row-major weight ``W [N, K]`` (element ``f = n K + k``), so a block
crosses rows when ``K % B != 0``; ``n_blocks = ceil(N K / B)``. Codes index a 16-entry table (``nf4``: NF4, ``fp4``:
bitsandbytes' FP4, :mod:`qcompile.schemes.bnb_blockwise`)::

    w[f] = table[code[f]] * absmax[f // B]                                        (float32 product)
    -dq:   absmax[b] = float32(map[absmax_code[b]] * nested_absmax[b // 256]) + nested_offset     (float32)

``-dq`` (QLoRA's double quantization, bitsandbytes' ``compress_statistics``): the float32 absmax minus its mean
(``nested_offset``) is coded with bitsandbytes' 8-bit dynamic map in blocks of 256, with a float32 absmax per 256.

Packed tensors, bitsandbytes' own state (a checkpoint loads with its bytes unchanged), in the op's order:

| tensor          | dtype   | shape                    | holds                                                     |
|-----------------|---------|--------------------------|-----------------------------------------------------------|
| `qweight`       | uint8   | `[ceil(N K / 2)]`        | code f: HIGH nibble of byte f // 2 for even f, low for odd |
| `absmax`        | float32 | `[n_blocks]`             | without -dq: absmax of each block                         |
| `absmax`        | uint8   | `[n_blocks]`             | -dq: dynamic-map code of (absmax - nested_offset)         |
| `nested_absmax` | float32 | `[ceil(n_blocks / 256)]` | -dq: absmax of each 256 coded absmax                      |
| `nested_offset` | float32 | `[1]`                    | -dq: mean of the float32 absmax                           |

An odd ``N K`` leaves the last low nibble to a padding code (bitsandbytes writes the code of 0). Bits per weight:
``4 + 32 / B`` (4.5 for B = 64), with -dq ``4 + 8 / B + 32 / (256 B)`` plus 32 bits (≈ 4.127 for B = 64).
:meth:`Bnb4.quantize` is bitsandbytes' own quantizer on CPU, code for code (the weight upcast to float32 first);
the 4-bit tables and the 8-bit dynamic map are constants of the scheme (:mod:`qcompile.schemes.bnb_blockwise`).
"""

from __future__ import annotations

import dataclasses
import re

import torch

from qcompile.schemes import bnb_blockwise as blockwise
from qcompile.schemes.base import PackedWeight, Scheme, TensorSpec
from qcompile.schemes.registry import Family, register_family

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_BLOCKSIZE = 64
#: elements per second-level block of the -dq absmax codes (bitsandbytes' ``nested_blocksize``)
NESTED_BLOCKSIZE = 256
_NAME = re.compile(r"^bnb-(?P<type>nf4|fp4)(?P<dq>-dq)?(?:-b(?P<block>\d+))?$")


@dataclasses.dataclass
class Bnb4Weight:
    """Unpacked bitsandbytes 4-bit state of an ``[N, K]`` weight.

    ``codes``: uint8 ``[N, K]`` (one table index per element); ``absmax``: float32 ``[n_blocks]``, or with double
    quantization uint8 ``[n_blocks]`` codes; ``nested_absmax``: float32 ``[ceil(n_blocks / 256)]`` or ``None``;
    ``nested_offset``: float32 ``[1]`` or ``None``; ``pad_code``: the nibble after an odd ``N K`` (bytes round-trip).
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    nested_absmax: torch.Tensor | None
    nested_offset: torch.Tensor | None
    pad_code: int = 0

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]


@dataclasses.dataclass(frozen=True)
class Bnb4(Scheme):
    """bitsandbytes NF4 / FP4 in blocks over the flattened weight; ``double_quant`` for ``-dq``."""

    quant_type: str = "nf4"
    double_quant: bool = False
    blocksize: int = DEFAULT_BLOCKSIZE
    version: int = 1
    family = "bnb4"

    def __post_init__(self):
        if self.quant_type not in blockwise.TABLES:
            raise ValueError(f"bnb4 quant_type must be one of {tuple(blockwise.TABLES)}, got {self.quant_type!r}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"bnb4 blocksize must be one of {BLOCKSIZES} (bitsandbytes' quantize_4bit), got "
                             f"{self.blocksize}")  # fmt: skip

    @property
    def name(self) -> str:
        block = "" if self.blocksize == DEFAULT_BLOCKSIZE else f"-b{self.blocksize}"
        return f"bnb-{self.quant_type}{'-dq' if self.double_quant else ''}{block}"

    @classmethod
    def from_name(cls, name: str):
        m = _NAME.match(name)
        if not m:
            return None
        block = int(m["block"]) if m["block"] else DEFAULT_BLOCKSIZE
        return cls(quant_type=m["type"], double_quant=bool(m["dq"]), blocksize=block)

    # -- geometry -------------------------------------------------------------------------------
    def padded_in_features(self, in_features: int) -> int:
        return in_features

    def n_blocks(self, out_features: int, in_features: int) -> int:
        return -(-out_features * in_features // self.blocksize)

    def tensors(self, out_features, in_features):
        numel, blocks = out_features * in_features, self.n_blocks(out_features, in_features)
        qweight = TensorSpec("qweight", ((numel + 1) // 2,), torch.uint8,
                             "4-bit codes of the flattened weight, element 2i in the high nibble of byte i")
        if not self.double_quant:
            return qweight, TensorSpec("absmax", (blocks,), torch.float32, f"absmax of each block of {self.blocksize}")
        return (
            qweight,
            TensorSpec("absmax", (blocks,), torch.uint8, "dynamic-map code of (block absmax - nested_offset)"),
            TensorSpec("nested_absmax", (-(-blocks // NESTED_BLOCKSIZE),), torch.float32,
                       f"absmax of each {NESTED_BLOCKSIZE} coded block absmax"),
            TensorSpec("nested_offset", (1,), torch.float32, "mean of the float32 block absmax"),
        )  # fmt: skip

    # -- reference quantization -------------------------------------------------------------------
    def quantize(self, weight: torch.Tensor) -> Bnb4Weight:
        """bitsandbytes' ``quantize_4bit(weight, blocksize, quant_type, compress_statistics)`` on CPU, in float32."""
        if weight.dim() != 2:
            raise ValueError(f"{self.name}: expected a 2-D [N, K] weight, got shape {list(weight.shape)}")
        n, k = weight.shape
        codes, absmax = blockwise.quantize_4bit(weight, self.blocksize, self.quant_type)
        pad = int(codes[-1]) if codes.numel() > n * k else 0
        if not self.double_quant:
            return Bnb4Weight(codes[: n * k].reshape(n, k), absmax, None, None, pad)
        offset = absmax.mean()
        coded, nested = blockwise.quantize_dynamic_8bit(absmax - offset, NESTED_BLOCKSIZE)
        return Bnb4Weight(codes[: n * k].reshape(n, k), coded, nested, offset.reshape(1), pad)

    def block_absmax(self, q: Bnb4Weight | PackedWeight) -> torch.Tensor:
        """float32 ``[n_blocks]``: the absmax of each block (double quantization undone, see the module docstring)."""
        absmax = q.absmax
        if not self.double_quant:
            return absmax
        return blockwise.decode_dynamic_8bit(absmax, q.nested_absmax, NESTED_BLOCKSIZE) + q.nested_offset

    def dequantize(self, q: Bnb4Weight) -> torch.Tensor:
        n, k = q.codes.shape
        levels = blockwise.table(self.quant_type, q.codes.device)[q.codes.reshape(-1).long()]
        scale = self.block_absmax(q).repeat_interleave(self.blocksize)[: n * k]
        return (levels * scale).reshape(n, k)

    def pack(self, q: Bnb4Weight) -> PackedWeight:
        codes = q.codes.reshape(-1)
        if codes.numel() % 2:
            codes = torch.cat([codes, codes.new_full((1,), q.pad_code)])
        tensors = {"qweight": blockwise.pack_nibbles(codes), "absmax": q.absmax}
        if self.double_quant:
            tensors.update(nested_absmax=q.nested_absmax, nested_offset=q.nested_offset)
        return self.checked_pack(PackedWeight(tensors), q.out_features, q.in_features)

    def unpack(self, packed: PackedWeight, in_features: int, out_features: int | None = None) -> Bnb4Weight:
        """Inverse of :meth:`pack`. ``N`` follows from the byte count (``out_features`` says it where ``K = 1``
        leaves it open: ``ceil(N / 2)`` bytes fit two ``N``)."""
        qweight = packed["qweight"]
        numel = qweight.numel() * 2
        n = out_features
        if n is None:
            k = max(in_features, 1)
            n = numel // k if numel % k == 0 else (numel - 1) // k
        if in_features < 1 or (n * in_features + 1) // 2 != qweight.numel():
            raise ValueError(f"{self.name}: qweight holds {qweight.numel()} bytes, not the codes of an [N={n}, "
                             f"K={in_features}] weight")  # fmt: skip
        codes = blockwise.unpack_nibbles(qweight, numel)
        pad = int(codes[-1]) if numel > n * in_features else 0
        return Bnb4Weight(codes[: n * in_features].reshape(n, in_features), packed["absmax"],
                          packed.get("nested_absmax"), packed.get("nested_offset"), pad)  # fmt: skip

    def dequantize_packed(self, packed, out_features: int, in_features: int) -> torch.Tensor:
        if not isinstance(packed, PackedWeight):
            packed = PackedWeight.from_list(self, packed, out_features, in_features)
        return self.dequantize(self.unpack(packed, in_features, out_features))


register_family(Family(
    "bnb4", Bnb4, examples=("bnb-nf4", "bnb-nf4-dq", "bnb-fp4", "bnb-fp4-dq-b128"),
    kernels=("qcompile.codegen.cpp.bnb4", "qcompile.codegen.triton.bnb4"), onnx="qcompile.onnx.families.bnb4:lower",
))  # fmt: skip
