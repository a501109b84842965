"""ggml block decoding against the peer (gguf-py ``gguf.quants.dequantize``), bit for bit: the bundled SmolLM2 file's
own Q4_1 and Q8_0 blocks, blocks made by gguf-py's quantizer and by qcompile's, and random bytes (finite f16 scales);
``encode(decode(bytes))`` gives the bytes back; the type tables equal the peer's constants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants
from gguf.constants import GGML_QUANT_SIZES

from qcompile.gguf.reader import TENSOR_TYPES
from qcompile.schemes import gguf_blocks
from qcompile.schemes.gguf_blocks import BLOCK_TYPES, dequantize
from qcompile.schemes.gguf_quantize import quantize_blocks

TYPES = list(BLOCK_TYPES)
LEGACY = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]


def _peer(qtype: str):
    return GGMLQuantizationType[qtype.upper()]


def _bitwise_equal(mine: torch.Tensor, theirs: np.ndarray) -> bool:
    return mine.dtype == torch.float32 and np.array_equal(mine.numpy().view(np.uint32), theirs.view(np.uint32))


def test_tables_equal_the_peer_constants():
    for name, kind in BLOCK_TYPES.items():
        assert kind.type_id == _peer(name).value, name
        assert (kind.qk, kind.nbytes) == GGML_QUANT_SIZES[_peer(name)], name
        assert sum(size for _, size in kind.layout) == kind.nbytes
    for type_id, (name, block, size) in TENSOR_TYPES.items():
        peer = GGMLQuantizationType(type_id)
        assert peer.name == name and GGML_QUANT_SIZES[peer] == (block, size), (type_id, name)


@pytest.mark.parametrize("tensor_type", ["Q4_1", "Q8_0"])
def test_real_smollm2_blocks_decode_bit_exactly(smollm2_path, tensor_type):
    reader = GGUFReader(smollm2_path)
    tensors = [t for t in reader.tensors if t.tensor_type.name == tensor_type]
    assert tensors, tensor_type
    for tensor in tensors[:3]:
        raw = np.asarray(tensor.data)[:512]  # rows of whole blocks
        mine = dequantize(torch.from_numpy(raw.copy()), tensor_type.lower())
        assert _bitwise_equal(mine, quants.dequantize(raw, tensor.tensor_type)), tensor.name


def _random_blocks(kind, rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, kind.nbytes), dtype=np.uint8)
    at = 0
    for field, size in kind.layout:
        if field in ("d", "dmin", "m"):  # finite f16 scales, some subnormal, some negative, some zero
            scale = (rng.standard_normal(rows) * 10.0 ** rng.integers(-6, 1, rows)).astype(np.float16)
            scale[::7] = 0
            raw[:, at : at + 2] = scale.view(np.uint8).reshape(rows, 2)
        at += size
    return raw


@pytest.mark.parametrize("qtype", TYPES)
def test_random_bytes_decode_bit_exactly_and_reencode(qtype):
    kind = BLOCK_TYPES[qtype]
    raw = _random_blocks(kind, 96, seed=kind.type_id)
    blocks = torch.from_numpy(raw.copy())
    mine = dequantize(blocks.reshape(12, -1), kind)
    assert _bitwise_equal(mine, quants.dequantize(raw.reshape(12, -1), _peer(qtype)))
    assert torch.equal(kind.encode(kind.decode(blocks)), blocks)


@pytest.mark.parametrize("qtype", TYPES)
def test_quantized_blocks_decode_bit_exactly(qtype):
    """Blocks from the peer's quantizer where it has one (legacy types), from qcompile's otherwise."""
    kind = BLOCK_TYPES[qtype]
    x = torch.randn(6, 2 * 256, generator=torch.Generator().manual_seed(3)) * 0.02
    x[1] = 0.0
    x[2, :256] *= 1e3
    if qtype in LEGACY:
        raw = quants.quantize(x.numpy(), _peer(qtype))
    else:
        raw = kind.encode(quantize_blocks(qtype, x.reshape(-1, kind.qk))).reshape(6, -1).numpy()
    mine = dequantize(torch.from_numpy(raw.copy()), kind)
    assert _bitwise_equal(mine, quants.dequantize(raw, _peer(qtype)))


def test_element_order_is_not_vacuous():
    """Swapping two bytes of the codes moves values: the comparison above would see a wrong element order."""
    kind = BLOCK_TYPES["q4_k"]
    raw = _random_blocks(kind, 4, seed=1)
    swapped = raw.copy()
    swapped[:, [20, 21]] = swapped[:, [21, 20]]  # two qs bytes
    assert not np.array_equal(quants.dequantize(swapped, _peer("q4_k")), quants.dequantize(raw, _peer("q4_k")))
    assert not torch.equal(dequantize(torch.from_numpy(swapped), kind), dequantize(torch.from_numpy(raw), kind))


def test_bad_block_bytes_are_refused_by_name():
    with pytest.raises(ValueError, match=r"q4_k: expected uint8 rows of whole 144-byte blocks"):
        gguf_blocks.dequantize(torch.zeros(2, 100, dtype=torch.uint8), "q4_k")
    with pytest.raises(ValueError, match="unknown ggml block type 'q7_0'"):
        gguf_blocks.block_type("q7_0")
