"""Step 1 of reading a GGUF (edgeprune.device.gguf_check): its layout, walked with struct before anything is
allocated.

gguf-py's reader trusts the counts in the header, so a header claiming 2^60 entries makes it loop and allocate for
minutes. `scan_layout` bounds every count and length by the bytes left in the file, and applies the rules of
llama.cpp's gguf.cpp (and a few stricter ones: positive dims, tensors laid out back to back in order, aligned,
inside the file). A fault is a `CorruptLayout`, which read_gguf turns into one EdgepruneError line.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path

import gguf

GGUF_VERSIONS = (2, 3)  # what both gguf-py's reader and llama.cpp's gguf.cpp accept
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_TENSOR_NAME = 63  # GGML_MAX_NAME is 64 including the terminating NUL
# gguf-py builds one Python object per array element; a real tokenizer has well under 1M entries, so a
# bigger array is a corrupt count, and refusing it keeps memory bounded.
MAX_ARRAY_ELEMENTS = 1 << 22
MAX_KEY_LENGTH = 1 << 16
_V = gguf.GGUFValueType
_SCALAR_SIZES = {
    _V.UINT8: 1, _V.INT8: 1, _V.BOOL: 1, _V.UINT16: 2, _V.INT16: 2, _V.UINT32: 4, _V.INT32: 4,
    _V.FLOAT32: 4, _V.UINT64: 8, _V.INT64: 8, _V.FLOAT64: 8,
}


class CorruptLayout(Exception):
    """A structural fault found while scanning; read_gguf turns it into one EdgepruneError line."""


class _Cursor:
    """Reads little-endian values from a mapped file, refusing any read that would pass the end."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> int:
        if n > self.left():
            raise CorruptLayout(f"{what} needs {n} bytes at offset {self.pos} but only {self.left()} remain")
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str):
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buf, start)[0]

    def string(self, what: str, limit: int | None = None) -> bytes:
        n = self.unpack("<Q", f"length of {what}")
        if limit is not None and n > limit:
            raise CorruptLayout(f"{what} claims {n} bytes (at most {limit} allowed)")
        start = self.take(n, what)
        return bytes(self.buf[start:start + n])


def scan_layout(path: Path, size: int) -> None:
    """Walk the `size`-byte file's header and tensor table; any structural fault raises CorruptLayout."""
    if size < 24:
        raise CorruptLayout(f"the file has {size} bytes, fewer than a GGUF header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf, size)
        cur.take(4, "magic")
        version = cur.unpack("<I", "version")
        if version not in GGUF_VERSIONS:
            hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
            raise CorruptLayout(f"GGUF version {version}{hint} is not one of {GGUF_VERSIONS}")
        n_tensors = cur.unpack("<Q", "tensor count")
        n_kv = cur.unpack("<Q", "metadata count")
        # Smallest possible entries: a KV is key length + 1-byte key + type + 1-byte value; a tensor info
        # is name length + 1-byte name + n_dims + one dim + type + offset.
        if n_kv * 14 > cur.left():
            raise CorruptLayout(f"the header claims {n_kv} metadata entries, more than {cur.left()} bytes can hold")
        if n_tensors * 25 > cur.left():
            raise CorruptLayout(f"the header claims {n_tensors} tensors, more than {cur.left()} bytes can hold")
        alignment = gguf.GGUF_DEFAULT_ALIGNMENT
        keys: set[str] = set()
        for i in range(n_kv):
            key = _utf8(cur.string(f"key {i}", MAX_KEY_LENGTH), f"key {i}")
            if not key:
                raise CorruptLayout(f"metadata key {i} is empty")
            if key in keys:
                raise CorruptLayout(f"metadata key {key!r} appears twice")
            keys.add(key)
            value_type = _value_type(cur.unpack("<I", f"type of {key}"), key)
            if value_type == _V.ARRAY:
                item_type = _value_type(cur.unpack("<I", f"item type of {key}"), key)
                if item_type == _V.ARRAY:
                    raise CorruptLayout(f"{key} is an array of arrays, which GGUF readers do not support")
                count = cur.unpack("<Q", f"length of {key}")
                if count > MAX_ARRAY_ELEMENTS:
                    raise CorruptLayout(f"{key} claims {count} items (at most {MAX_ARRAY_ELEMENTS} allowed)")
                if item_type == _V.STRING:
                    if count * 8 > cur.left():
                        raise CorruptLayout(f"{key} claims {count} strings, more than {cur.left()} bytes can hold")
                    for j in range(count):
                        _utf8(cur.string(f"{key}[{j}]"), f"{key}[{j}]")
                else:
                    cur.take(count * _SCALAR_SIZES[item_type], f"{count} items of {key}")
            elif value_type == _V.STRING:
                _utf8(cur.string(key), key)
            else:
                start = cur.take(_SCALAR_SIZES[value_type], key)
                if key == gguf.Keys.General.ALIGNMENT:
                    if value_type != _V.UINT32:
                        raise CorruptLayout(f"{key} must be a uint32")
                    alignment = struct.unpack_from("<I", buf, start)[0]
                    if alignment == 0 or alignment & (alignment - 1):
                        raise CorruptLayout(f"{key} = {alignment} is not a power of two")
        names: set[str] = set()
        expected_offset = 0
        layout: list[tuple[str, int, int]] = []
        for i in range(n_tensors):
            name = _utf8(cur.string(f"name of tensor {i}", MAX_TENSOR_NAME), f"name of tensor {i}")
            if not name or name in names:
                raise CorruptLayout(f"tensor {i} has an empty or repeated name {name!r}")
            names.add(name)
            n_dims = cur.unpack("<I", f"dimension count of {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise CorruptLayout(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            dims = [cur.unpack("<Q", f"dimensions of {name}") for _ in range(n_dims)]
            if any(d < 1 or d >= 1 << 62 for d in dims):
                raise CorruptLayout(f"tensor {name} has an impossible shape {dims}")
            raw_type = cur.unpack("<I", f"type of {name}")
            try:
                tensor_type = gguf.GGMLQuantizationType(raw_type)
                block, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
            except (ValueError, KeyError):
                raise CorruptLayout(f"tensor {name} has unknown type {raw_type}") from None
            if dims[0] % block:
                raise CorruptLayout(f"tensor {name} rows of {dims[0]} are not a multiple of its {tensor_type.name} block of {block}")
            n_bytes = math.prod(dims) // block * type_size
            offset = cur.unpack("<Q", f"offset of {name}")
            if offset != expected_offset:
                raise CorruptLayout(f"tensor {name} starts at data offset {offset}, expected {expected_offset}")
            layout.append((name, offset, n_bytes))
            expected_offset = offset + -(-n_bytes // alignment) * alignment
        data_start = -(-cur.pos // alignment) * alignment
        for name, offset, n_bytes in layout[-1:]:  # back to back, so the last tensor ends the data
            if data_start + offset + n_bytes > size:
                raise CorruptLayout(f"tensor {name} ends at byte {data_start + offset + n_bytes}, past the end of the "
                               f"{size}-byte file")


def _value_type(raw: int, key: str) -> gguf.GGUFValueType:
    try:
        return _V(raw)
    except ValueError:
        raise CorruptLayout(f"{key} has unknown value type {raw}") from None


def _utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptLayout(f"{what} is not valid UTF-8") from None
