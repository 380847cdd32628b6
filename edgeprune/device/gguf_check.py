"""Read and check a GGUF before anything else touches it.

GGUF files are untrusted: a truncated download or a flipped byte can crash llama.cpp's native loader
(e.g. a duplicated token trips a GGML_ASSERT that aborts the process), and gguf-py's reader trusts the
counts in the header, so a header claiming 2^60 entries makes it loop and allocate for minutes. So the
file is checked in three steps, each turning every problem into one EdgepruneError line:

1. `_scan_layout` walks the header with struct, bounding every count and length by the bytes left in
   the file before anything is allocated, and applies the rules of llama.cpp's gguf.cpp (and a few
   stricter ones: positive dims, tensors laid out back to back in order, aligned, inside the file).
2. gguf-py's GGUFReader parses it (now bounded), for the callers that use its fields and tensors.
3. The metadata is cross-checked against the tensors and the tokenizer against itself, so what passes
   here loads in llama.cpp or fails there with an error, not an abort.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from edgeprune.core.errors import EdgepruneError

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
_INTEGER_TYPES = {_V.UINT8, _V.INT8, _V.UINT16, _V.INT16, _V.UINT32, _V.INT32, _V.UINT64, _V.INT64}
# Shape keys the pipeline reads with int(); each must be a whole number (or, per layer, an array of them).
_ARCH_INT_KEYS = {
    "context_length": 1, "embedding_length": 1, "block_count": 1, "vocab_size": 1,
    "feed_forward_length": 0, "attention.head_count": 0, "attention.head_count_kv": 0,
    "attention.key_length": 1, "attention.value_length": 1, "rope.dimension_count": 1,
}
_PER_LAYER_KEYS = ("feed_forward_length", "attention.head_count", "attention.head_count_kv")
_SPECIAL_ID_KEYS = tuple(k for k in vars(gguf.Keys.Tokenizer).values() if isinstance(k, str) and k.endswith("_id"))


@dataclass
class GGUFInfo:
    reader: gguf.GGUFReader
    architecture: str
    name: str | None
    context_length: int
    block_count: int

    def value(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def arch_value(self, key: str, default=None):
        return self.value(f"{self.architecture}.{key}", default)


# Metadata that cannot change what llama.cpp computes: names, licences and other general.* facts, edgeprune's own
# provenance (edgeprune.source, edgeprune.profile), the chat template (applied to messages before tokens exist),
# and gguf-py's header pseudo-fields (the tensor count is in the tensors).
_NOT_COMPUTED_FROM = ("general.", "edgeprune.", "GGUF.")
_NOT_COMPUTED_FROM_KEYS = ("tokenizer.chat_template",)


def logits_digest(info: GGUFInfo) -> str:
    """sha256 of what decides a GGUF's logits: every tensor (name, type, shape, bytes) and every metadata key
    llama.cpp may read (rope, norms, heads, tokenizer, ...), as stored. GGUFs with the same digest compute the same
    logits whatever their general.name or edgeprune.profile say; a changed rope.freq_base alone changes it."""
    digest = hashlib.sha256()
    for field in info.reader.fields.values():
        if field.name.startswith(_NOT_COMPUTED_FROM) or field.name in _NOT_COMPUTED_FROM_KEYS:
            continue
        stored = sum(part.nbytes for part in field.parts)
        digest.update(bytes(info.reader.data[field.offset:field.offset + stored]))
    for t in info.reader.tensors:
        digest.update(f"{t.name}:{int(t.tensor_type)}:{[int(d) for d in t.shape]}\n".encode())
        digest.update(t.data)
    return digest.hexdigest()


_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


def copy_gguf(reader: gguf.GGUFReader, path: Path, *, drop_prefixes: tuple[str, ...] = (),
              changes: dict | None = None) -> Path:
    """A copy of a GGUF written by gguf-py, its tensors as they are, without the metadata keys starting with
    `drop_prefixes` and with the values in `changes` (key: value) replaced."""
    changes = changes or {}
    writer = gguf.GGUFWriter(path, reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith(("GGUF.", *drop_prefixes)) or field.name == "general.architecture":
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, changes.get(field.name, field.contents()), field.types[0],
                             sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _one_line(text: str) -> str:
    """Escape the line breaks a corrupt file can put into names, so an error stays one line."""
    return text.translate(_LINE_BREAKS)


class _Corrupt(Exception):
    """A structural fault found while scanning; read_gguf turns it into one EdgepruneError line."""


def read_gguf(path: str | Path) -> GGUFInfo:
    """Check `path` thoroughly and return its parsed header; any fault is one EdgepruneError line."""
    path = Path(path)
    if not path.is_file():
        raise EdgepruneError(f"GGUF file {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise EdgepruneError(f"{path} is not a GGUF file (no GGUF magic): give a .gguf written by llama.cpp or edgeprune")
    try:
        _scan_layout(path, size)
    except _Corrupt as exc:
        raise EdgepruneError(_one_line(f"{path} is truncated or corrupt: {exc}: download or export it again")) from None
    try:
        reader = _Reader(path)
        info = _describe(reader, path)
        _check_tensors_inside_file(reader, path, size)
        _check_metadata_types(info, path)
        _check_metadata_matches_tensors(info, path)
        _check_tensor_names(info, path)
        _check_tokenizer(info, path)
    except EdgepruneError as exc:
        raise EdgepruneError(_one_line(str(exc))) from None  # names from the file may hold line breaks
    except Exception as exc:  # any parse failure of untrusted bytes is the file's fault, not a crash of ours
        raise EdgepruneError(f"{path} is truncated or corrupt ({type(exc).__name__}): download or export it again") from exc
    return info


class _Reader(gguf.GGUFReader):
    """gguf-py's reader over a plain ndarray view of its memmap. Every slice of a np.memmap runs numpy's Python-level
    memmap hooks, and the reader slices each of a vocabulary's ~100k strings and merges several times: cProfile put
    three quarters of read_gguf there, and this view takes a SmolLM2 GGUF's parse from 2.5-3.2 s to 0.8-1.0 s of CPU.
    The fields and tensors are the same values, still backed by the mapped file."""

    def _get(self, offset, dtype, count=1, override_order=None):
        if type(self.data) is not np.ndarray:
            self.data = self.data.view(np.ndarray)
        return super()._get(offset, dtype, count, override_order)


# --- step 1: the layout, bounded by the file size, before any allocation

class _Cursor:
    """Reads little-endian values from a mapped file, refusing any read that would pass the end."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> int:
        if n > self.left():
            raise _Corrupt(f"{what} needs {n} bytes at offset {self.pos} but only {self.left()} remain")
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str):
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buf, start)[0]

    def string(self, what: str, limit: int | None = None) -> bytes:
        n = self.unpack("<Q", f"length of {what}")
        if limit is not None and n > limit:
            raise _Corrupt(f"{what} claims {n} bytes (at most {limit} allowed)")
        start = self.take(n, what)
        return bytes(self.buf[start:start + n])


def _scan_layout(path: Path, size: int) -> None:
    if size < 24:
        raise _Corrupt(f"the file has {size} bytes, fewer than a GGUF header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf, size)
        cur.take(4, "magic")
        version = cur.unpack("<I", "version")
        if version not in GGUF_VERSIONS:
            hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
            raise _Corrupt(f"GGUF version {version}{hint} is not one of {GGUF_VERSIONS}")
        n_tensors = cur.unpack("<Q", "tensor count")
        n_kv = cur.unpack("<Q", "metadata count")
        # Smallest possible entries: a KV is key length + 1-byte key + type + 1-byte value; a tensor info
        # is name length + 1-byte name + n_dims + one dim + type + offset.
        if n_kv * 14 > cur.left():
            raise _Corrupt(f"the header claims {n_kv} metadata entries, more than {cur.left()} bytes can hold")
        if n_tensors * 25 > cur.left():
            raise _Corrupt(f"the header claims {n_tensors} tensors, more than {cur.left()} bytes can hold")
        alignment = gguf.GGUF_DEFAULT_ALIGNMENT
        keys: set[str] = set()
        for i in range(n_kv):
            key = _utf8(cur.string(f"key {i}", MAX_KEY_LENGTH), f"key {i}")
            if not key:
                raise _Corrupt(f"metadata key {i} is empty")
            if key in keys:
                raise _Corrupt(f"metadata key {key!r} appears twice")
            keys.add(key)
            value_type = _value_type(cur.unpack("<I", f"type of {key}"), key)
            if value_type == _V.ARRAY:
                item_type = _value_type(cur.unpack("<I", f"item type of {key}"), key)
                if item_type == _V.ARRAY:
                    raise _Corrupt(f"{key} is an array of arrays, which GGUF readers do not support")
                count = cur.unpack("<Q", f"length of {key}")
                if count > MAX_ARRAY_ELEMENTS:
                    raise _Corrupt(f"{key} claims {count} items (at most {MAX_ARRAY_ELEMENTS} allowed)")
                if item_type == _V.STRING:
                    if count * 8 > cur.left():
                        raise _Corrupt(f"{key} claims {count} strings, more than {cur.left()} bytes can hold")
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
                        raise _Corrupt(f"{key} must be a uint32")
                    alignment = struct.unpack_from("<I", buf, start)[0]
                    if alignment == 0 or alignment & (alignment - 1):
                        raise _Corrupt(f"{key} = {alignment} is not a power of two")
        names: set[str] = set()
        expected_offset = 0
        layout: list[tuple[str, int, int]] = []
        for i in range(n_tensors):
            name = _utf8(cur.string(f"name of tensor {i}", MAX_TENSOR_NAME), f"name of tensor {i}")
            if not name or name in names:
                raise _Corrupt(f"tensor {i} has an empty or repeated name {name!r}")
            names.add(name)
            n_dims = cur.unpack("<I", f"dimension count of {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise _Corrupt(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            dims = [cur.unpack("<Q", f"dimensions of {name}") for _ in range(n_dims)]
            if any(d < 1 or d >= 1 << 62 for d in dims):
                raise _Corrupt(f"tensor {name} has an impossible shape {dims}")
            raw_type = cur.unpack("<I", f"type of {name}")
            try:
                tensor_type = gguf.GGMLQuantizationType(raw_type)
                block, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
            except (ValueError, KeyError):
                raise _Corrupt(f"tensor {name} has unknown type {raw_type}") from None
            if dims[0] % block:
                raise _Corrupt(f"tensor {name} rows of {dims[0]} are not a multiple of its {tensor_type.name} block of {block}")
            n_bytes = math.prod(dims) // block * type_size
            offset = cur.unpack("<Q", f"offset of {name}")
            if offset != expected_offset:
                raise _Corrupt(f"tensor {name} starts at data offset {offset}, expected {expected_offset}")
            layout.append((name, offset, n_bytes))
            expected_offset = offset + -(-n_bytes // alignment) * alignment
        data_start = -(-cur.pos // alignment) * alignment
        for name, offset, n_bytes in layout[-1:]:  # back to back, so the last tensor ends the data
            if data_start + offset + n_bytes > size:
                raise _Corrupt(f"tensor {name} ends at byte {data_start + offset + n_bytes}, past the end of the "
                               f"{size}-byte file")


def _value_type(raw: int, key: str) -> gguf.GGUFValueType:
    try:
        return _V(raw)
    except ValueError:
        raise _Corrupt(f"{key} has unknown value type {raw}") from None


def _utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Corrupt(f"{what} is not valid UTF-8") from None


# --- step 3: meaning, once the structure is known to be sound

def _describe(reader: gguf.GGUFReader, path: Path) -> GGUFInfo:
    field = reader.fields.get(gguf.Keys.General.ARCHITECTURE)
    if field is None:
        raise EdgepruneError(f"{path} has no general.architecture key: it is not a model GGUF")
    arch = field.contents()
    if not isinstance(arch, str) or not arch:
        raise EdgepruneError(f"{path} has a general.architecture that is not a name: the file is corrupt")
    info = GGUFInfo(reader, arch, None, 0, 0)
    name = info.value(gguf.Keys.General.NAME)
    info.name = name if isinstance(name, str) else None
    return info


def _check_tensors_inside_file(reader: gguf.GGUFReader, path: Path, size: int) -> None:
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise EdgepruneError(f"{path} is truncated: tensor {t.name} ends past the end of the file")


def _check_metadata_types(info: GGUFInfo, path: Path) -> None:
    """Shape keys must be whole numbers: the pipeline and llama.cpp both read them as integers."""
    for key, minimum in _ARCH_INT_KEYS.items():
        field = info.reader.fields.get(f"{info.architecture}.{key}")
        if field is None:
            continue
        per_layer = field.types[0] == _V.ARRAY and key in _PER_LAYER_KEYS
        item_type = field.types[-1] if per_layer else field.types[0]
        values = field.contents() if per_layer else [field.contents()]
        bad = item_type not in _INTEGER_TYPES or not values or any(v < minimum for v in values)
        if not bad and key == "attention.head_count" and values[0] < 1:
            bad = True  # layer 0 must keep attention, and the KV-cache size divides by its head count
        if bad:
            raise EdgepruneError(
                f"{path}: {info.architecture}.{key} = {str(field.contents())[:60]} is not a valid count: the file is corrupt"
            )
    info.context_length = int(info.arch_value("context_length", 2048))
    info.block_count = int(info.arch_value("block_count", 0))


def _check_metadata_matches_tensors(info: GGUFInfo, path: Path) -> None:
    tensors = {t.name: t for t in info.reader.tensors}
    blocks = set()
    for name in tensors:
        if name.startswith("blk."):
            index = name.split(".")[1]
            if not index.isdigit():
                raise EdgepruneError(f"{path} has a tensor {name!r} with no layer number: the file is corrupt")
            blocks.add(int(index))
    if blocks and (info.block_count != len(blocks) or max(blocks) != info.block_count - 1):
        raise EdgepruneError(
            f"{path} says {info.block_count} layers but holds tensors for {len(blocks)}: the file is inconsistent"
        )
    embd = tensors.get("token_embd.weight")
    n_embd = info.arch_value("embedding_length")
    if embd is not None and n_embd is not None and int(embd.shape[0]) != int(n_embd):
        raise EdgepruneError(
            f"{path} says embedding_length {n_embd} but token_embd is {int(embd.shape[0])} wide: the file is inconsistent"
        )
    heads = info.arch_value("attention.head_count")
    key_length = info.arch_value("attention.key_length")
    if isinstance(heads, list) and len(heads) != info.block_count:
        raise EdgepruneError(f"{path} lists head counts for {len(heads)} layers but has {info.block_count}: "
                             "the file is inconsistent")
    if key_length is None and heads is not None and n_embd:
        widest = max(heads) if isinstance(heads, list) else heads
        key_length = int(n_embd) // widest if widest else None
    heads_kv = info.arch_value("attention.head_count_kv", heads)
    if heads is None or key_length is None:
        return
    for bid in sorted(blocks):
        for kind, counts in (("attn_q", heads), ("attn_k", heads_kv)):
            tensor = tensors.get(f"blk.{bid}.{kind}.weight")
            n = counts[bid] if isinstance(counts, list) else counts
            if tensor is None or not n:
                continue  # no attention here, or deci's linear attention (no K/V heads)
            rows = int(tensor.shape[1]) if len(tensor.shape) > 1 else 1
            if rows != int(n) * int(key_length):
                raise EdgepruneError(f"{path} says layer {bid} has {n} {kind[-1].upper()} heads of {key_length} "
                                     f"but {kind} has {rows} rows: the file is inconsistent")


def _check_tensor_names(info: GGUFInfo, path: Path) -> None:
    """Every tensor must be one its architecture defines, and a llama needs all of a layer's weights:
    transformers' GGUF loader silently fills a missing or misnamed weight with random values."""
    arch = next((a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == info.architecture), None)
    if arch is None:
        return  # an architecture gguf-py does not know: the loaders refuse it by name
    valid: set[str] = set()
    for kind in gguf.MODEL_TENSORS.get(arch, ()):
        template = gguf.TENSOR_NAMES[kind]
        try:
            bases = {template.format(bid=b) for b in range(info.block_count)} if "{bid}" in template else {template}
        except (KeyError, IndexError):
            continue  # per-expert names and the like: not in the architectures edgeprune writes
        valid.update(f"{base}.{suffix}" for base in bases for suffix in ("weight", "bias"))
    names = {t.name for t in info.reader.tensors}
    unknown = sorted(names - valid)
    if unknown:
        raise EdgepruneError(f"{path} holds a tensor {unknown[0]!r} that a {info.architecture} model does not have: "
                             "the file is corrupt")
    if info.architecture not in ("llama", "qwen2"):
        return  # deci layers may lack attention or FFN by design
    required = ["token_embd.weight", "output_norm.weight"]
    for b in range(info.block_count):
        required += [f"blk.{b}.{k}.weight" for k in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm")]
        dense = [f"blk.{b}.{k}.weight" for k in ("ffn_gate", "ffn_up", "ffn_down")]
        experts = [f"blk.{b}.{k}.weight" for k in ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")]
        required += dense if not set(experts) <= names else []
    missing = [name for name in required if name not in names]
    if missing:
        raise EdgepruneError(f"{path} lacks the tensor {missing[0]!r} that every {info.architecture} model has: "
                             "the file is corrupt")


def _check_tokenizer(info: GGUFInfo, path: Path) -> None:
    """The checks whose failure would abort llama.cpp (duplicate tokens) or break reading the vocab back."""
    fields = info.reader.fields
    tokens_field = fields.get(gguf.Keys.Tokenizer.LIST)
    if tokens_field is None:
        return  # no tokenizer: the loaders say so themselves
    if tokens_field.types != [_V.ARRAY, _V.STRING] and not (tokens_field.types == [_V.ARRAY] and not tokens_field.data):
        raise EdgepruneError(f"{path}: tokenizer.ggml.tokens is not a list of strings: the file is corrupt")
    tokens = tokens_field.contents()
    # llama.cpp renames an empty token to [EMPTY_<i>] and aborts when two tokens are equal after that.
    words = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    if len(set(words)) != len(words):
        seen: set[str] = set()
        repeated = next(w for w in words if w in seen or seen.add(w))
        raise EdgepruneError(f"{path}: token {repeated!r} appears twice in the vocabulary: the file is corrupt")
    for key, allowed in ((gguf.Keys.Tokenizer.SCORES, {_V.FLOAT32, _V.INT32}),
                         (gguf.Keys.Tokenizer.TOKEN_TYPE, {_V.INT32})):
        field = fields.get(key)
        if field is None:
            continue
        if field.types[0] != _V.ARRAY or field.types[-1] not in allowed or len(field.data) != len(tokens):
            raise EdgepruneError(f"{path}: {key} does not match the {len(tokens)} tokens: the file is corrupt")
    merges = fields.get(gguf.Keys.Tokenizer.MERGES)
    if merges is not None and merges.data:
        if merges.types != [_V.ARRAY, _V.STRING]:
            raise EdgepruneError(f"{path}: tokenizer.ggml.merges is not a list of strings: the file is corrupt")
        # A BPE merge "a b" joins two tokens into a third; all three must be in the vocabulary, or the
        # tokenizers library refuses the whole tokenizer (llama.cpp silently keeps the useless merge).
        vocab = set(tokens)
        for merge in merges.contents():
            left, space, right = merge.partition(" ")
            if not space or not left or not right or " " in right or not {left, right, left + right} <= vocab:
                raise EdgepruneError(f"{path}: tokenizer merge {merge!r} does not join two tokens of the "
                                     "vocabulary: the file is corrupt")
    for key in _SPECIAL_ID_KEYS:
        field = fields.get(key)
        if field is not None and field.types[0] not in _INTEGER_TYPES:
            raise EdgepruneError(f"{path}: {key} is not a token id: the file is corrupt")
    embd = next((t for t in info.reader.tensors if t.name == "token_embd.weight"), None)
    if embd is not None and len(embd.shape) > 1 and int(embd.shape[1]) != len(tokens):
        raise EdgepruneError(f"{path} has {len(tokens)} tokens but token_embd has {int(embd.shape[1])} rows: "
                             "the file is inconsistent")
