"""Read and check a GGUF before anything else touches it.

GGUF files are untrusted: a truncated download or a flipped byte can crash llama.cpp's native loader,
which takes the whole Python process with it. gguf-py's reader parses the header in Python, where every
failure becomes a one-line error, and the metadata is cross-checked against the tensors it describes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .errors import EdgepruneError


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


def read_gguf(path: str | Path) -> GGUFInfo:
    path = Path(path)
    if not path.is_file():
        raise EdgepruneError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise EdgepruneError(f"{path} is not a GGUF file (no GGUF magic): give a .gguf written by llama.cpp or edgeprune")
    try:
        reader = gguf.GGUFReader(path)
        info = _describe(reader, path)
        _check_tensors_inside_file(reader, path)
        _check_metadata_matches_tensors(info, path)
    except EdgepruneError:
        raise
    except Exception as exc:  # any parse failure of untrusted bytes is the file's fault, not a crash of ours
        raise EdgepruneError(f"{path} is truncated or corrupt ({type(exc).__name__}): download or export it again") from exc
    return info


def _describe(reader: gguf.GGUFReader, path: Path) -> GGUFInfo:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise EdgepruneError(f"{path} has no general.architecture key: it is not a model GGUF")
    arch = field.contents()
    info = GGUFInfo(reader, arch, None, 0, 0)
    info.name = info.value("general.name")
    info.context_length = int(info.arch_value("context_length", 2048))
    info.block_count = int(info.arch_value("block_count", 0))
    return info


def _check_tensors_inside_file(reader: gguf.GGUFReader, path: Path) -> None:
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise EdgepruneError(f"{path} is truncated: tensor {t.name} ends past the end of the file")


def _check_metadata_matches_tensors(info: GGUFInfo, path: Path) -> None:
    tensors = {t.name: t for t in info.reader.tensors}
    blocks = {int(name.split(".")[1]) for name in tensors if name.startswith("blk.")}
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
    head_dim = info.arch_value("attention.key_length") or (int(n_embd) // int(np.max(heads)) if heads is not None and n_embd else None)
    for bid in sorted(blocks):
        q = tensors.get(f"blk.{bid}.attn_q.weight")
        if q is None or heads is None or head_dim is None:
            continue
        n_head = int(heads[bid]) if isinstance(heads, list) else int(heads)
        if int(q.shape[1]) != n_head * int(head_dim):
            raise EdgepruneError(
                f"{path} says layer {bid} has {n_head} heads of {head_dim} but attn_q has {int(q.shape[1])} rows: the file is inconsistent"
            )
