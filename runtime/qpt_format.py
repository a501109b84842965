"""The ``.qpt`` container: constants, the fixed header, and the one error type every load failure raises.

Layout of a ``.qpt`` file (all integers little-endian; see ``docs/qpt-format.md``)::

    offset  size  field
    0       4     magic b"QPT1"
    4       2     format major (u16)          a reader refuses a major it does not know
    6       2     format minor (u16)          newer minors add optional fields / members only
    8       8     manifest length L (u64)     bytes of UTF-8 JSON that follow the header
    16      32    sha256 of the manifest bytes
    48      L     manifest (JSON object)
    D       ...   members, D = align_up(48 + L, 64); each member starts at D + its "offset", a multiple of 64

Members are listed in ``manifest["members"]`` in file order, each ``{"name", "kind", "offset", "size",
"sha256"}``; between two members (and between the manifest and the first member) lie only the zero bytes
that reach the next 64-byte boundary, and the file ends exactly at the end of the last member.
"""

from __future__ import annotations

import re
import struct
import sys

MAGIC = b"QPT1"
FORMAT_MAJOR = 2
FORMAT_MINOR = 0
HEADER = struct.Struct("<4sHHQ32s")  # magic, major, minor, manifest length, manifest sha256
HEADER_SIZE = HEADER.size  # 48
ALIGNMENT = 64

MAX_MANIFEST_BYTES = 64 << 20  # a manifest lists layers, not weights: 64 MiB is generous
MAX_JSON_MEMBER_BYTES = 256 << 20
MAX_SAFETENSORS_HEADER_BYTES = 100 << 20  # the limit the safetensors library applies
INT64_MAX = (1 << 63) - 1

#: members this reader understands; others (written by a newer minor) are bounds-checked and skipped
MEMBER_KINDS = ("json", "safetensors")
MEMBER_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")

#: safetensors dtype codes → (torch dtype name, bytes per element)
DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}  # fmt: skip
DTYPE_CODES = {name: code for code, (name, _) in DTYPES.items()}

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ArtifactError(ValueError):
    """A ``.qpt`` file that cannot be loaded safely: truncated, tampered, inconsistent or from an
    unknown format version. The message names the file part (header, manifest, member, tensor, node)
    and the byte offset where one applies."""


def align_up(value: int, alignment: int = ALIGNMENT) -> int:
    return -(-value // alignment) * alignment


def check_little_endian() -> None:
    if sys.byteorder != "little":
        raise ArtifactError(".qpt files hold little-endian tensors; this machine is big-endian")


def check_dotted_name(name, where: str) -> str:
    """A module-attribute path such as ``model.layers.0.mlp.up_proj.qweight``.

    Each part is a Python identifier or a decimal index, never a dunder, so the name can only ever
    address a buffer slot, never an attribute of the module machinery.
    """
    if not isinstance(name, str) or not name or len(name) > 1024:
        raise ArtifactError(f"{where}: {name!r} is not a valid attribute path")
    for part in name.split("."):
        if not (part.isdigit() or _IDENTIFIER.match(part)) or part.startswith("__"):
            raise ArtifactError(f"{where}: {name!r} is not a valid attribute path (bad part {part!r})")
    return name


def check_identifier(name, where: str) -> str:
    import keyword

    if not isinstance(name, str) or not _IDENTIFIER.match(name) or keyword.iskeyword(name) or len(name) > 256:
        raise ArtifactError(f"{where}: {name!r} is not a valid identifier")
    return name


def shape_numel(shape, where: str) -> int:
    """Element count of ``shape`` (a list of non-negative ints) that fits in int64, else ArtifactError."""
    if not isinstance(shape, list) or len(shape) > 16:
        raise ArtifactError(f"{where}: shape {shape!r} is not a list of at most 16 dimensions")
    numel = 1
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise ArtifactError(f"{where}: shape {shape!r} has a dimension that is not a non-negative integer")
        numel *= dim
        if numel > INT64_MAX:
            raise ArtifactError(f"{where}: shape {shape!r} has more than 2**63-1 elements")
    return numel


def strict_json(data: bytes, where: str, limit: int):
    """Parse UTF-8 JSON that must not repeat a key in any object, nor nest absurdly deep."""
    import json

    if len(data) > limit:
        raise ArtifactError(f"{where}: {len(data)} bytes, more than the {limit} allowed")

    def no_duplicates(pairs):
        out = {}
        for key, value in pairs:
            if key in out:
                raise ArtifactError(f"{where}: key {key!r} appears twice in one object")
            out[key] = value
        return out

    def no_constants(token):
        raise ArtifactError(f"{where}: {token} is not valid JSON")

    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except ArtifactError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ArtifactError(f"{where}: not valid JSON ({type(error).__name__}: {error})") from None
