"""Read and check a GGUF file's header before anything else touches the file.

A GGUF file is a header (metadata key/values, then one record per tensor:
name, shape, ggml type, offset) followed by aligned tensor data. Every count,
length and offset in the header is untrusted: each is bounded here, and by the
bytes the file really has, so a hostile file costs at most a small multiple of
its own size to read and never recurses. Every problem is a ModelLoadError of
one line naming the key or tensor at fault.

docs/model_files.md summarises the layout and lists the bounds.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from engine.errors import ModelLoadError

# ggml tensor types by id (ggml.h's enum ggml_type).
GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K",
    16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
    22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 30: "BF16",
}
# (values per block, bytes per block) of the types whose size we check.
GGML_BLOCKS = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "F64": (1, 8),
    "I8": (1, 1), "I16": (1, 2), "I32": (1, 4), "I64": (1, 8),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
    "Q8_0": (32, 34), "Q8_1": (32, 36),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176),
    "Q6_K": (256, 210), "Q8_K": (256, 292),
}

# Metadata value types: id -> struct format of a scalar (8: string, 9: array).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# Bounds far above any real model (a 256k-token vocabulary, 100 KB chat
# templates, a few thousand tensors) and far below what would hurt.
MAX_KEYS = 1 << 16
MAX_TENSORS = 1 << 20
MAX_ARRAY = 1 << 24
MAX_STRING = 16 << 20
MAX_DIMS = 4           # GGML_MAX_DIMS
MAX_ELEMENTS = 1 << 48
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 16


class GGUFTensor(msgspec.Struct, frozen=True):
    """One tensor record; `shape` is row-major (numpy order, the reverse of
    GGUF's list), `offset` is from the start of the file, `nbytes` is None
    for types whose block size is not known here."""

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int | None


class GGUFHeader(msgspec.Struct, frozen=True):
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    file_size: int

    def check_tensor_data(self, path: Path) -> None:
        """Every tensor of a known type lies inside the file, at its size."""
        for t in self.tensors.values():
            if t.nbytes is None:
                continue
            per_block = GGML_BLOCKS[t.ggml_type][0]
            if t.shape[-1] % per_block:
                raise ModelLoadError(f"{path}: tensor {t.name!r} has rows of {t.shape[-1]} "
                                     f"values, not a multiple of {t.ggml_type}'s {per_block}")
            if t.offset + t.nbytes > self.file_size:
                raise ModelLoadError(
                    f"{path}: tensor {t.name!r} ({t.nbytes} bytes at {t.offset}) ends past "
                    f"the end of the file ({self.file_size} bytes)")


class _Cursor:
    """Bounds-checked little-endian reads from a byte buffer."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: corrupt GGUF header: {what}")

    def take(self, n: int, what: str) -> int:
        """Reserve n bytes; returns where they start."""
        if n < 0 or n > len(self.buf) - self.pos:
            raise self.fail(f"{what} runs past the end of the file")
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str):
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buf, start)

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)[0]

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)[0]

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        if n > MAX_STRING:
            raise self.fail(f"{what} claims {n} bytes (at most {MAX_STRING})")
        start = self.take(n, what)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None


def _value(cur: _Cursor, vtype: int, key: str, in_array: bool = False) -> Any:
    if vtype in _SCALARS:
        return cur.unpack(_SCALARS[vtype], f"metadata {key}")[0]
    if vtype == _STRING:
        return cur.string(f"metadata {key}")
    if vtype == _ARRAY:
        if in_array:  # the format allows it; no loader here reads one
            raise cur.fail(f"metadata {key} nests arrays (not supported)")
        etype, count = cur.unpack("<IQ", f"metadata {key}")
        if count > MAX_ARRAY:
            raise cur.fail(f"metadata {key} claims {count} elements (at most {MAX_ARRAY})")
        if etype in _SCALARS:
            dtype = np.dtype(_SCALARS[etype])  # struct and numpy share these codes
            start = cur.take(count * dtype.itemsize, f"metadata {key}")
            return np.frombuffer(cur.buf, dtype, count, start).tolist()
        if etype == _STRING:
            # Each string needs at least its 8-byte length: checked up front so a
            # huge count fails before the loop, not after a long one.
            if count * 8 > len(cur.buf) - cur.pos:
                raise cur.fail(f"metadata {key} runs past the end of the file")
            return [cur.string(f"metadata {key}[{i}]") for i in range(count)]
        return _value(cur, etype, key, in_array=True)
    raise cur.fail(f"metadata {key} has unknown value type {vtype}")


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse and bound-check the header of the GGUF file at `path`."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise ModelLoadError(f"{path}: not a GGUF file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(buf, path, size)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read GGUF file: {exc.strerror or exc}") from None


def _parse(buf, path: Path, size: int) -> GGUFHeader:
    if bytes(buf[:4]) != b"GGUF":
        raise ModelLoadError(f"{path}: not a GGUF file")
    cur = _Cursor(buf, path)
    cur.take(4, "magic")
    version = cur.u32("version")
    if version not in (2, 3):
        raise ModelLoadError(f"{path}: unsupported GGUF version {version}")
    n_tensors, n_kv = cur.unpack("<QQ", "counts")
    # A key/value takes at least 13 bytes and a tensor record 28.
    if n_kv > MAX_KEYS or n_kv * 13 > size:
        raise cur.fail(f"{n_kv} metadata keys cannot fit in the file")
    if n_tensors > MAX_TENSORS or n_tensors * 28 > size:
        raise cur.fail(f"{n_tensors} tensors cannot fit in the file")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        if key in metadata:
            raise cur.fail(f"metadata {key} appears twice")
        vtype = cur.u32(f"the type of metadata {key}")
        if key == "general.alignment" and vtype != 4:  # readers take it as a uint32
            raise cur.fail(f"general.alignment has value type {vtype}, not uint32 (4)")
        metadata[key] = _value(cur, vtype, key)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not 0 < alignment <= MAX_ALIGNMENT or alignment & (alignment - 1):
        raise cur.fail(f"general.alignment {alignment!r} is not a power of two "
                       f"up to {MAX_ALIGNMENT}")

    records = []
    for i in range(n_tensors):
        name = cur.string(f"the name of tensor #{i}")
        n_dims = cur.u32(f"tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS})")
        dims = cur.unpack(f"<{n_dims}Q", f"tensor {name!r}")
        ttype, offset = cur.unpack("<IQ", f"tensor {name!r}")
        records.append((name, dims, ttype, offset))
    data_start = -(-cur.pos // alignment) * alignment

    tensors: dict[str, GGUFTensor] = {}
    for name, dims, ttype, offset in records:
        if name in tensors:
            raise cur.fail(f"tensor {name!r} appears twice")
        elements = 1
        for d in dims:
            elements *= d
        if min(dims) < 1 or elements > MAX_ELEMENTS:
            raise cur.fail(f"tensor {name!r} has shape {list(dims)}")
        if offset % alignment or offset > size:
            raise cur.fail(f"tensor {name!r} has offset {offset} (the file is {size} bytes, "
                           f"alignment {alignment})")
        type_name = GGML_TYPES.get(ttype, f"type {ttype}")
        per_block, block_bytes = GGML_BLOCKS.get(type_name, (0, 0))
        nbytes = -(-elements // per_block) * block_bytes if per_block else None
        tensors[name] = GGUFTensor(name, type_name, tuple(reversed(dims)), data_start + offset,
                                   nbytes)
    return GGUFHeader(version, metadata, tensors, size)
