"""Read and check a GGUF before anything else touches it.

GGUF files are untrusted: a truncated download or a flipped byte can crash llama.cpp's native loader
(e.g. a duplicated token trips a GGML_ASSERT that aborts the process), and gguf-py's reader trusts the
counts in the header, so a header claiming 2^60 entries makes it loop and allocate for minutes. So the
file is checked in three steps, each turning every problem into one EdgepruneError line:

1. `scan_layout` (edgeprune.device.gguf_layout) walks the header with struct, bounding every count and length
   by the bytes left in the file before anything is allocated, and applies the rules of llama.cpp's gguf.cpp
   (and a few stricter ones: positive dims, tensors laid out back to back in order, aligned, inside the file).
2. gguf-py's GGUFReader parses it (now bounded), for the callers that use its fields and tensors.
3. The metadata is cross-checked against the tensors and the tokenizer against itself, so what passes
   here loads in llama.cpp or fails there with an error, not an abort.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from edgeprune.core.errors import EdgepruneError
from edgeprune.device.gguf_layout import CorruptLayout, scan_layout

_V = gguf.GGUFValueType
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


def _one_line(text: str) -> str:
    """Escape the line breaks a corrupt file can put into names, so an error stays one line."""
    return text.translate(_LINE_BREAKS)


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
        scan_layout(path, size)
    except CorruptLayout as exc:
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


# --- step 2 is gguf-py's reader (above); step 3: meaning, once the structure is known to be sound

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
