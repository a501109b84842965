"""qcompile's own GGUF reader: a file written by the peer's writer (gguf-py ``GGUFWriter``) reads as the peer's
reader sees it; the same file with corrupted bytes is refused with a ``GGUFError`` naming the key or tensor and the
offset: truncation, lying counts, offsets past the end or misaligned or overlapping, more than 4 dimensions, shapes
whose element count overflows int64, huge string and array lengths, unknown value and tensor types, bad UTF-8."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants

from qcompile.gguf import GGUFError, read


@pytest.fixture
def forged(tmp_path):
    """``(path, bytes)`` of a small valid file: a string, a string array, a float array, an F32 and a Q8_0 tensor."""
    path = tmp_path / "forged.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_string("general.name", "forged")
    writer.add_array("tokenizer.ggml.tokens", ["a", "bc", "ü"])
    writer.add_array("some.floats", [0.5, 1.5])
    writer.add_uint32("llama.block_count", 1)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_tensor("f.weight", np.arange(128, dtype=np.float32).reshape(2, 64))
    q8 = quants.quantize(np.linspace(-1, 1, 3 * 64, dtype=np.float32).reshape(3, 64), GGMLQuantizationType.Q8_0)
    writer.add_tensor("q.weight", q8, raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, bytearray(path.read_bytes())


def _key_at(data: bytearray, key: str) -> int:
    """Offset just after ``key``'s bytes (its value type follows)."""
    raw = key.encode()
    return data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)


def _tensor_at(data: bytearray, name: str) -> int:
    """Offset of ``name``'s ``n_dims`` in its tensor info."""
    raw = name.encode()
    return data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)


def _corrupt(tmp_path, data: bytearray, at: int, fmt: str, value) -> str:
    out = bytearray(data)
    struct.pack_into(fmt, out, at, value)
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(out))
    return str(path)


def test_valid_file_reads_as_the_peer_reads_it(forged):
    path, _ = forged
    mine, peer = read(path), GGUFReader(path)
    for key, field in peer.fields.items():
        if not key.startswith("GGUF."):
            assert mine.metadata[key] == field.contents(), key
            assert mine.value_types[key][0] == field.types[0].value, key
    for tensor in peer.tensors:
        info = mine.tensors[tensor.name]
        assert info.type_id == tensor.tensor_type.value and list(info.shape) == tensor.shape.tolist()
        peer_bytes = np.asarray(tensor.data).view(np.uint8).reshape(-1)
        assert np.array_equal(mine.raw(tensor.name).numpy().reshape(-1), peer_bytes)
    assert np.array_equal(mine.tensor("f.weight").numpy(), np.arange(128, dtype=np.float32).reshape(2, 64))


def test_truncated_files(forged, tmp_path):
    path, data = forged
    end = max(t.offset + t.nbytes for t in read(path).tensors.values())
    for cut in (0, 3, 10, 20, _key_at(data, "general.name") + 6, _tensor_at(data, "q.weight") + 6, end - 1):
        (tmp_path / "cut.gguf").write_bytes(bytes(data[:cut]))
        with pytest.raises(GGUFError, match=r"cut.gguf: .*(offset|empty file)"):
            read(tmp_path / "cut.gguf")


def test_lying_counts(forged, tmp_path):
    _, data = forged
    with pytest.raises(GGUFError, match=r"tensor count 1099511627776 at offset 8 exceeds"):
        read(_corrupt(tmp_path, data, 8, "<Q", 2**40))
    with pytest.raises(GGUFError, match=r"metadata count 1099511627776 at offset 16 exceeds"):
        read(_corrupt(tmp_path, data, 16, "<Q", 2**40))
    with pytest.raises(GGUFError, match=r"offset"):  # one tensor more than written: the data is read as an info
        read(_corrupt(tmp_path, data, 8, "<Q", 3))


def test_offsets_past_the_end_misaligned_or_overlapping(forged, tmp_path):
    _, data = forged
    offset_at = _tensor_at(data, "q.weight") + 4 + 2 * 8 + 4
    with pytest.raises(GGUFError, match=r"tensor 'q.weight' at offset \d+: data .* runs past the end"):
        read(_corrupt(tmp_path, data, offset_at, "<Q", 2**40))
    with pytest.raises(GGUFError, match=r"tensor 'q.weight' at offset \d+: data offset 513 is not a multiple of"):
        read(_corrupt(tmp_path, data, offset_at, "<Q", 513))
    with pytest.raises(GGUFError, match=r"tensor '[fq].weight' at offset \d+: its data overlaps tensor '[fq].weight'"):
        read(_corrupt(tmp_path, data, offset_at, "<Q", 0))


def test_bad_shapes_and_types(forged, tmp_path):
    _, data = forged
    dims_at = _tensor_at(data, "q.weight")
    with pytest.raises(GGUFError, match=r"tensor 'q.weight' at offset \d+: 5 dimensions \(at most 4\)"):
        read(_corrupt(tmp_path, data, dims_at, "<I", 5))
    with pytest.raises(GGUFError, match=r"tensor 'q.weight' .*shape \[64, 2305843009213693952\].*more than int64"):
        read(_corrupt(tmp_path, data, dims_at + 12, "<Q", 2**61))
    with pytest.raises(GGUFError, match=r"tensor 'q.weight' .*Q8_0 rows of 33 elements are not whole 32-element"):
        read(_corrupt(tmp_path, data, dims_at + 4, "<Q", 33))
    with pytest.raises(GGUFError, match=r"tensor 'q.weight' at offset \d+: unknown ggml type id 99"):
        read(_corrupt(tmp_path, data, dims_at + 4 + 16, "<I", 99))


def test_bad_metadata(forged, tmp_path):
    _, data = forged
    name_at = _key_at(data, "general.name")
    with pytest.raises(GGUFError, match=r"metadata 'general.name' at offset \d+: string length 1125899906842624 "
                                        r"exceeds"):  # fmt: skip
        read(_corrupt(tmp_path, data, name_at + 4, "<Q", 2**50))
    with pytest.raises(GGUFError, match=r"metadata 'general.name' at offset \d+: unknown value type 99"):
        read(_corrupt(tmp_path, data, name_at, "<I", 99))
    with pytest.raises(GGUFError, match=r"metadata 'general.name' .*not UTF-8"):
        read(_corrupt(tmp_path, data, name_at + 12, "<B", 0xFF))
    tokens_at = _key_at(data, "tokenizer.ggml.tokens")
    with pytest.raises(GGUFError, match=r"metadata 'tokenizer.ggml.tokens' at offset \d+: array count 4294967296 of "
                                        r"string exceeds"):  # fmt: skip
        read(_corrupt(tmp_path, data, tokens_at + 8, "<Q", 2**32))
    with pytest.raises(GGUFError, match=r"metadata 'tokenizer.ggml.tokens' .*array of unknown value type 77"):
        read(_corrupt(tmp_path, data, tokens_at + 4, "<I", 77))


def test_bad_magic_version_and_duplicates(forged, tmp_path):
    path, data = forged
    with pytest.raises(GGUFError, match=r"not a GGUF file \(magic b'GGUX' at offset 0"):
        read(_corrupt(tmp_path, data, 3, "<B", ord("X")))
    with pytest.raises(GGUFError, match=r"GGUF version 1 at offset 4 is not supported"):
        read(_corrupt(tmp_path, data, 4, "<I", 1))
    duplicate = bytearray(data)
    raw = b"q.weight"
    at = duplicate.index(struct.pack("<Q", len(raw)) + raw)
    duplicate[at + 8 : at + 16] = b"f.weight"
    (tmp_path / "dup.gguf").write_bytes(bytes(duplicate))
    with pytest.raises(GGUFError, match=r"tensor 'f.weight' at offset \d+: duplicate tensor name"):
        read(tmp_path / "dup.gguf")
