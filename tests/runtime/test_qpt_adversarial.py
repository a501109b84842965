"""Hostile ``.qpt`` files: each must fail with :class:`ArtifactError` whose message names the broken part.

A good file is taken apart into manifest + member bytes, damaged, and put back together — with the
checksums recomputed where the test wants to reach the deeper checks (an attacker can recompute sha256
too; the checksums catch corruption, the structural checks catch forgery).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct

import pytest
import torch

from qcompile.export import export, load
from qcompile.runtime.qpt_format import HEADER, HEADER_SIZE, MAGIC, ArtifactError, align_up


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(96, 32)
        self.down = torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("qpt") / "good.qpt"
    export(_Model().eval(), (torch.randn(4, 96),), "int4-g32", path, progress_bar=False)
    return path.read_bytes()


# -- taking a file apart and putting it back ---------------------------------------------------------
def split(data: bytes) -> tuple[dict, dict[str, bytes]]:
    length = HEADER.unpack_from(data, 0)[3]
    manifest = json.loads(data[HEADER_SIZE : HEADER_SIZE + length])
    start = align_up(HEADER_SIZE + length)
    blobs = {r["name"]: data[start + r["offset"] : start + r["offset"] + r["size"]] for r in manifest["members"]}
    return manifest, blobs


def assemble(manifest: dict, blobs: dict[str, bytes], relayout: bool = True, rehash: bool = True,
             major: int = 2, raw_manifest: bytes | None = None) -> bytes:  # fmt: skip
    """Rebuild a file. ``relayout`` recomputes member offsets/sizes, ``rehash`` the member checksums."""
    rows = manifest["members"]
    if relayout:
        offset = 0
        for row in rows:
            row["offset"], row["size"] = offset, len(blobs[row["name"]])
            offset = align_up(offset + row["size"])
    if rehash:
        for row in rows:
            blob = blobs[row["name"]]
            if row["kind"] == "safetensors":
                (n,) = struct.unpack_from("<Q", blob, 0)
                blob = blob[: 8 + n]
            row["sha256"] = hashlib.sha256(blob).hexdigest()
    text = raw_manifest
    if text is None:
        text = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    out = bytearray(HEADER.pack(MAGIC, major, 0, len(text), hashlib.sha256(text).digest()) + text)
    start = align_up(len(out))
    for row in rows:
        out += b"\0" * min(start + row["offset"] - len(out), 1 << 20)  # forged huge offsets: no real padding
        out += blobs[row["name"]]
    return bytes(out)


def split_safetensors(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack_from("<Q", blob, 0)
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join_safetensors(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (align_up(8 + len(text)) - 8 - len(text))
    return struct.pack("<Q", len(text)) + text + data


def expect(tmp_path, data: bytes, *fragments: str) -> str:
    path = tmp_path / "bad.qpt"
    path.write_bytes(data)
    with pytest.raises(ArtifactError) as info:
        load(path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


# -- the good file loads, and re-assembling it changes nothing ----------------------------------------
def test_reassembled_good_file_loads(good, tmp_path):
    manifest, blobs = split(good)
    assert assemble(manifest, blobs) == good
    (tmp_path / "ok.qpt").write_bytes(good)
    assert load(tmp_path / "ok.qpt")(torch.randn(3, 96)).shape == (3, 16)


# -- bytes missing or added ----------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [0, 10, HEADER_SIZE - 1, HEADER_SIZE + 20, -200, -1])
def test_truncated(good, tmp_path, keep):
    expect(tmp_path, good[:keep] if keep >= 0 else good[: len(good) + keep], "bad.qpt")


def test_truncated_names_the_part(good, tmp_path):
    expect(tmp_path, good[:20], "header", "48")
    expect(tmp_path, good[: HEADER_SIZE + 20], "header: manifest length")
    expect(tmp_path, good[:-1], "member 'examples'", "past the end")


def test_trailing_garbage(good, tmp_path):
    expect(tmp_path, good + b"garbage", "unexpected bytes after the last member")


def test_not_a_qpt_file(tmp_path):
    expect(tmp_path, b"PK\x03\x04" + b"\0" * 100, "magic", "not a .qpt file")


# -- header fields -------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [2**63 - 5, 2**64 - 1, 2**40])
def test_manifest_length_near_2_63(good, tmp_path, length):
    bad = bytearray(good)
    struct.pack_into("<Q", bad, 8, length)
    expect(tmp_path, bytes(bad), "header: manifest length", str(length))


def test_future_major_version_is_refused_with_the_writer_version(good, tmp_path):
    manifest, blobs = split(good)
    manifest["format"]["major"] = 3
    message = expect(tmp_path, assemble(manifest, blobs, major=3), "format 3.0", "written by qcompile", "upgrade")
    assert "reads (format 2.x)" in message


def test_older_major_version_is_refused_clearly(good, tmp_path):
    bad = bytearray(good)
    struct.pack_into("<H", bad, 4, 0)
    expect(tmp_path, bytes(bad), "format 0.0", "predates", "export the model again")


# -- member table ---------------------------------------------------------------------------------------
def test_overlapping_members(good, tmp_path):
    manifest, blobs = split(good)
    manifest["members"][1]["offset"] = 0
    expect(tmp_path, assemble(manifest, blobs, relayout=False), "member 'weights'", "overlaps")


def test_gap_between_members(good, tmp_path):
    manifest, blobs = split(good)
    manifest["members"][1]["offset"] += 128
    expect(tmp_path, assemble(manifest, blobs, relayout=False), "member 'weights'", "gap")


@pytest.mark.parametrize("offset", [2**62, 2**63 + 64, 1 << 40])
def test_out_of_range_member(good, tmp_path, offset):
    manifest, blobs = split(good)
    manifest["members"][-1]["offset"] = offset
    manifest["members"][-1]["size"] = 64
    expect(tmp_path, assemble(manifest, blobs, relayout=False, rehash=False), "member")


def test_unaligned_member(good, tmp_path):
    manifest, blobs = split(good)
    manifest["members"][1]["offset"] += 8
    expect(tmp_path, assemble(manifest, blobs, relayout=False), "member 'weights'", "multiple of 64")


def test_nonzero_padding(good, tmp_path):
    manifest, blobs = split(good)
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    if align_up(HEADER_SIZE + len(text)) == HEADER_SIZE + len(text):
        text += b" "  # JSON may end in white space: this manifest leaves padding before the members
    data = bytearray(assemble(manifest, blobs, raw_manifest=text))
    gap_start = HEADER_SIZE + len(text)
    assert align_up(gap_start) > gap_start
    data[gap_start] = 1
    expect(tmp_path, bytes(data), "padding")


@pytest.mark.parametrize("name", ["../graph", "/etc/passwd", "graph/../../x", "GRAPH", "", "a" * 100])
def test_path_like_member_names(good, tmp_path, name):
    manifest, blobs = split(good)
    manifest["members"][0]["name"] = name
    blobs[name] = blobs.pop("graph")
    expect(tmp_path, assemble(manifest, blobs), "not a plain lower-case name")


def test_duplicate_member(good, tmp_path):
    manifest, blobs = split(good)
    manifest["members"].append(dict(manifest["members"][0]))
    expect(tmp_path, assemble(manifest, blobs), "member 'graph': listed twice")


def test_missing_member(good, tmp_path):
    manifest, blobs = split(good)
    manifest["members"] = [r for r in manifest["members"] if r["name"] != "graph"]
    expect(tmp_path, assemble(manifest, blobs), "required member 'graph'")


def test_duplicate_key_in_manifest(good, tmp_path):
    manifest, blobs = split(good)
    assemble(manifest, blobs)  # fills offsets and hashes
    text = json.dumps(manifest).encode()
    text = text[:-1] + b', "plan": []}'
    forged = assemble(manifest, blobs, relayout=False, rehash=False, raw_manifest=text)
    expect(tmp_path, forged, "'plan' appears twice")


# -- checksums and forged content ------------------------------------------------------------------------
def test_flipped_manifest_byte(good, tmp_path):
    bad = bytearray(good)
    bad[HEADER_SIZE + 30] ^= 0x04
    expect(tmp_path, bytes(bad), "manifest: checksum mismatch")


def test_one_flipped_bit_in_a_tensor_names_the_tensor(good, tmp_path):
    manifest, blobs = split(good)
    header, data = split_safetensors(blobs["weights"])
    begin = header["down.qweight"]["data_offsets"][0]
    flipped = bytearray(data)
    flipped[begin + 3] ^= 0x10
    blobs["weights"] = join_safetensors(header, bytes(flipped))
    expect(tmp_path, assemble(manifest, blobs), "tensor 'down.qweight' checksum mismatch", "bytes")


def test_flipped_bit_in_graph(good, tmp_path):
    manifest, blobs = split(good)
    graph = bytearray(blobs["graph"])
    graph[40] ^= 0x01
    blobs["graph"] = bytes(graph)
    expect(tmp_path, assemble(manifest, blobs, rehash=False), "member 'graph': checksum mismatch")


def test_manifest_that_is_not_a_json_object(good, tmp_path):
    manifest, blobs = split(good)
    expect(tmp_path, assemble(manifest, blobs, raw_manifest=b"[1, 2, 3]"), "manifest: not a JSON object")


def test_manifest_that_is_not_utf8(good, tmp_path):
    manifest, blobs = split(good)
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    text = text.replace(b'"format":', b'"\xff\xfe":1,"format":', 1)
    message = expect(tmp_path, assemble(manifest, blobs, raw_manifest=text), "manifest")
    assert "utf" in message.lower(), message


def test_unknown_tensor_dtype_code(good, tmp_path):
    manifest, blobs = split(good)
    header, data = split_safetensors(blobs["weights"])
    header["up.scales"]["dtype"] = "Q7"
    blobs["weights"] = join_safetensors(header, data)
    expect(tmp_path, assemble(manifest, blobs), "up.scales", "unknown dtype 'Q7'")


def test_tampered_manifest_shape(good, tmp_path):
    manifest, blobs = split(good)
    manifest["members"][1]["tensors"]["up.scales"]["shape"] = [32, 2]
    expect(tmp_path, assemble(manifest, blobs), "tensor 'up.scales'", "in the manifest")


def test_missing_tensor_entry(good, tmp_path):
    manifest, blobs = split(good)
    del manifest["members"][1]["tensors"]["up.zeros"]
    expect(tmp_path, assemble(manifest, blobs), "tensors differ from the manifest", "up.zeros")


def test_shape_product_overflows_int64(good, tmp_path):
    manifest, blobs = split(good)
    header, data = split_safetensors(blobs["weights"])
    big = [2**32, 2**32, 2**32]
    header["up.qweight"]["shape"] = big
    manifest["members"][1]["tensors"]["up.qweight"]["shape"] = big
    blobs["weights"] = join_safetensors(header, data)
    expect(tmp_path, assemble(manifest, blobs), "tensor 'up.qweight'", "more than 2**63-1 elements")


def test_byte_length_disagrees_with_shape(good, tmp_path):
    manifest, blobs = split(good)
    header, data = split_safetensors(blobs["weights"])
    header["up.qweight"]["shape"] = [32, 47]
    manifest["members"][1]["tensors"]["up.qweight"]["shape"] = [32, 47]
    blobs["weights"] = join_safetensors(header, data)
    expect(tmp_path, assemble(manifest, blobs), "tensor 'up.qweight'", "bytes for 1504 elements")


def test_overlapping_tensors(good, tmp_path):
    manifest, blobs = split(good)
    header, data = split_safetensors(blobs["weights"])
    a, b = header["down.scales"]["data_offsets"], header["down.zeros"]["data_offsets"]
    header["down.zeros"]["data_offsets"] = [a[0], a[0] + b[1] - b[0]]
    blobs["weights"] = join_safetensors(header, data)
    expect(tmp_path, assemble(manifest, blobs), "overlaps the tensor before it")


def test_tensor_offsets_outside_the_blob(good, tmp_path):
    manifest, blobs = split(good)
    header, data = split_safetensors(blobs["weights"])
    size = header["up.qweight"]["data_offsets"][1] - header["up.qweight"]["data_offsets"][0]
    header["up.qweight"]["data_offsets"] = [2**62, 2**62 + size]
    blobs["weights"] = join_safetensors(header, data)
    expect(tmp_path, assemble(manifest, blobs), "tensor 'up.qweight'", "fall outside")


def test_group_size_that_does_not_fit_the_packed_shape(good, tmp_path):
    manifest, blobs = split(good)
    row = next(r for r in manifest["plan"] if r["site"]["name"] == "up")
    row["scheme"] = "int4-g64"  # K = 96: g64 pads to 128 and wants 2 groups, the file packs 3 groups of 32
    expect(tmp_path, assemble(manifest, blobs), "plan[0] (up, int4-g64)", "do not fit the scheme", "qweight")


def test_graph_scheme_disagrees_with_plan(good, tmp_path):
    manifest, blobs = split(good)
    graph = json.loads(blobs["graph"])
    for node in graph["nodes"]:
        if node.get("target") == "qcompile.linear.default":
            node["args"][3] = "int8"
    blobs["graph"] = json.dumps(graph).encode()
    expect(tmp_path, assemble(manifest, blobs), "graph member: node", "scheme 'int8'")


# -- code execution attempts ----------------------------------------------------------------------------
class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("member", ["graph", "weights"])
def test_pickle_payload_in_a_member_is_never_executed(good, tmp_path, member):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Marker(str(marker)))
    manifest, blobs = split(good)
    blobs[member] = payload
    expect(tmp_path, assemble(manifest, blobs), f"member {member!r}")
    assert not marker.exists()


def test_pickle_member_kind_is_refused(good, tmp_path):
    marker = tmp_path / "pwned"
    manifest, blobs = split(good)
    manifest["members"].append({"name": "state", "kind": "pickle", "offset": 0, "size": 0, "sha256": ""})
    blobs["state"] = pickle.dumps(_Marker(str(marker)))
    expect(tmp_path, assemble(manifest, blobs), "member 'state'", "kind 'pickle'")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("target", "builtins.eval", "not an allow-listed op"),
        ("target", "os.system.default", "not an allow-listed op"),
        ("target", "aten.no_such_op.default", "does not exist"),
        ("name", "x = __import__('os')", "not a valid identifier"),
    ],
)
def test_graph_cannot_name_arbitrary_code(good, tmp_path, field, value, fragment):
    manifest, blobs = split(good)
    graph = json.loads(blobs["graph"])
    node = next(n for n in graph["nodes"] if n["op"] == "call_function")
    node[field] = value
    blobs["graph"] = json.dumps(graph).encode()
    expect(tmp_path, assemble(manifest, blobs), "graph member: node", fragment)


def test_deeply_nested_graph_argument(good, tmp_path):
    manifest, blobs = split(good)
    text = blobs["graph"].decode()
    nested = "[" * 900 + "1" + "]" * 900
    blobs["graph"] = text.replace('"kwargs":{}', '"kwargs":{"x":' + nested + "}", 1).encode()
    expect(tmp_path, assemble(manifest, blobs), "graph member")


def test_graph_attribute_path_cannot_reach_module_internals(good, tmp_path):
    manifest, blobs = split(good)
    graph = json.loads(blobs["graph"])
    node = next(n for n in graph["nodes"] if n["op"] == "get_attr")
    node["target"] = "__class__.__init__"
    blobs["graph"] = json.dumps(graph).encode()
    expect(tmp_path, assemble(manifest, blobs), "graph member: node", "not a valid attribute path")


def test_output_type_outside_the_allow_list(good, tmp_path):
    manifest, blobs = split(good)
    graph = json.loads(blobs["graph"])
    graph["out_spec"] = json.dumps([1, {"type": "os.PathLike", "context": "null", "children_spec": []}])
    blobs["graph"] = json.dumps(graph).encode()
    expect(tmp_path, assemble(manifest, blobs), "out_spec", "'os.PathLike' is not one a .qpt may use")


def test_no_stray_files_after_failed_loads(good, tmp_path):
    before = set(os.listdir(tmp_path))
    expect(tmp_path, good[:100], "bad.qpt")
    assert set(os.listdir(tmp_path)) - before == {"bad.qpt"}


@pytest.mark.parametrize(
    "nodes, fragment",
    [
        ([{"name": "evil_file", "op": "call_function", "target": "aten.from_file.default",
           "args": ["victim.txt", True, 16], "kwargs": {}}], "takes str 'filename'"),
        ([{"name": "evil_ones", "op": "call_function", "target": "aten.full.default", "args": [[4], 1], "kwargs": {}},
          {"name": "evil_fill", "op": "call_function", "target": "aten.fill_.Scalar",
           "args": [{"node": "evil_ones"}, 65], "kwargs": {}}], "mutates its inputs"),
    ],
)  # fmt: skip
def test_graph_cannot_touch_files_or_mutate(good, tmp_path, nodes, fragment):
    """Valid checksums, allow-listed namespace — but ops that read/write files or mutate are refused at load."""
    manifest, blobs = split(good)
    graph = json.loads(blobs["graph"])
    graph["nodes"] = graph["nodes"][:-1] + nodes + graph["nodes"][-1:]
    blobs["graph"] = json.dumps(graph).encode()
    expect(tmp_path, assemble(manifest, blobs), "graph member: node", fragment)


def test_format_1_file_is_refused_with_how_to_re_export(good, tmp_path):
    manifest, blobs = split(good)
    manifest["format"]["major"] = 1
    expect(tmp_path, assemble(manifest, blobs, major=1), "format 1.0", "predates format 2", "export the model again")


# -- a site's tensors against its scheme's declared specs ----------------------------------------------
def test_site_tensors_renamed(good, tmp_path):
    manifest, blobs = split(good)
    row = next(r for r in manifest["plan"] if r["site"]["name"] == "up")
    row["tensors"] = {("codes" if key == "qweight" else key): path for key, path in row["tensors"].items()}
    expect(tmp_path, assemble(manifest, blobs), "plan[", "(up, int4-g32)", "'qweight', 'scales', 'zeros'",
           "got ['codes', 'scales', 'zeros']")  # fmt: skip


def test_site_missing_a_declared_tensor(good, tmp_path):
    manifest, blobs = split(good)
    row = next(r for r in manifest["plan"] if r["site"]["name"] == "up")
    del row["tensors"]["zeros"]
    expect(tmp_path, assemble(manifest, blobs), "(up, int4-g32)", "'tensors' must name exactly", "got ['qweight', 'scales']")


def test_site_tensor_of_the_wrong_dtype(good, tmp_path):
    """The plan points a site's ``scales`` at its ``zeros`` tensor: same shape, still float32 — so point it at the
    int8 codes of another site instead, whose dtype the spec refuses."""
    manifest, blobs = split(good)
    rows = {r["site"]["name"]: r for r in manifest["plan"] if r["scheme"]}
    up = rows["up"]
    other = next(r for name, r in rows.items() if name != "up")
    up["tensors"]["scales"] = other["tensors"]["qweight"]
    expect(tmp_path, assemble(manifest, blobs), "(up, int4-g32)", "do not fit the scheme", "scales")
