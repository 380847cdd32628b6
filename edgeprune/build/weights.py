"""Lazy weights: one tensor at a time from safetensors files or a GGUF, never the whole model in memory.

The layer-streamed pipeline (`edgeprune.build.streaming`) asks for one decoder layer's tensors, converts them to
float32, works on them and lets them go. Tensors are read with plain file reads, not a memory map, so that a
16 GB checkpoint read once does not stay counted in the process's resident memory. The embedding matrix is the
exception: it is memory-mapped in its stored type and only the rows a lookup needs are converted.

Names are transformers' (model.layers.3.mlp.down_proj.weight), whatever the file calls them, and values are
exactly what transformers' own loaders produce (bf16→float32 is exact; GGUF blocks go through gguf-py's
dequantize and q/k rows are un-permuted, as transformers does), so both paths see the same numbers.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgeprune.core.errors import EdgepruneError

# safetensors dtype -> (torch dtype, bytes per element)
_SAFETENSORS_DTYPES = {"F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2)}
EMBEDDING = "model.embed_tokens.weight"


@dataclass(frozen=True)
class _Stored:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The header of a safetensors file and where its data starts, checked against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise EdgepruneError(f"{path} is truncated ({size} bytes): download it again")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, 100 << 20):
            raise EdgepruneError(f"{path} has a corrupt header (claims {header_len} bytes): download it again")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EdgepruneError(f"{path} has a corrupt header: download it again") from exc
    data_size = size - 8 - header_len
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if end > data_size:
        raise EdgepruneError(
            f"{path} is truncated: its tensors need {end} bytes of data but the file has {data_size}: download it again"
        )
    return header, 8 + header_len


class SafetensorsWeights:
    """Every tensor of the *.safetensors files in a directory (one file or shards), read on demand."""

    def __init__(self, files: list[Path]):
        self.stored: dict[str, _Stored] = {}
        for file in files:
            header, data_start = read_safetensors_header(file)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in _SAFETENSORS_DTYPES:
                    raise EdgepruneError(f"{file} stores {name} as {info['dtype']}: edgeprune reads F32, F16 and BF16 "
                                         "checkpoints; convert the weights to one of them")
                start, end = info["data_offsets"]
                self.stored[name] = _Stored(file, info["dtype"], tuple(info["shape"]), data_start + start, end - start)

    def names(self) -> set[str]:
        return set(self.stored)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def stored_bytes(self) -> int:
        return sum(s.nbytes for s in self.stored.values())

    def load(self, name: str) -> torch.Tensor:
        entry = self._entry(name)
        buffer = bytearray(entry.nbytes)
        with open(entry.file, "rb") as f:
            f.seek(entry.offset)
            if f.readinto(buffer) != entry.nbytes:
                raise EdgepruneError(f"{entry.file} ended inside tensor {name}: download it again")
        return self._decode(buffer, entry)

    def rows(self, name: str, index: np.ndarray) -> torch.Tensor:
        """Rows of a matrix, read through a memory map of its stored bytes."""
        entry = self._entry(name)
        _, itemsize = _SAFETENSORS_DTYPES[entry.dtype]
        stored = np.memmap(entry.file, dtype=np.dtype(f"V{itemsize}"), mode="r", offset=entry.offset,
                           shape=entry.shape)
        picked = np.ascontiguousarray(stored[index])
        del stored
        return self._decode(bytearray(picked.tobytes()), _Stored(entry.file, entry.dtype, picked.shape, 0, 0))

    @staticmethod
    def _decode(buffer: bytearray, entry: _Stored) -> torch.Tensor:
        dtype, _ = _SAFETENSORS_DTYPES[entry.dtype]
        if not buffer:
            return torch.zeros(entry.shape, dtype=torch.float32)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry.shape).to(torch.float32)

    def _entry(self, name: str) -> _Stored:
        if name not in self.stored:
            raise EdgepruneError(f"the checkpoint has no tensor {name}: it is incomplete or its config.json was edited")
        return self.stored[name]


# GGUF tensor kind -> transformers name, for the tensors of a llama GGUF
_GGUF_GLOBAL = {"token_embd.weight": EMBEDDING, "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}


class GGUFWeights:
    """The tensors of a GGUF of one of edgeprune's families, dequantized to float32 one at a time, under
    transformers' names. `writer` is the family's converter (converters.family_writer): its table names the
    tensors, q/k rows are put back in transformers' order where it permutes them, and its norm offset (Gemma's
    1 + w) is taken off again."""

    def __init__(self, path: Path, n_head: int, n_head_kv: int, writer, reader=None):
        import gguf

        from converters.base import NORM_KINDS

        self.reader = reader or gguf.GGUFReader(path)  # parsing a 49k-token vocabulary takes seconds: share it
        self.n_head, self.n_head_kv, self.rope_permuted = n_head, n_head_kv, writer.rope_permuted
        by_kind = {gguf.TENSOR_NAMES[kind]: module for module, kind in writer.tensor_table.items()}
        norms = {gguf.TENSOR_NAMES[kind] for kind in NORM_KINDS}
        self.tensors, self.offsets = {}, {}
        for tensor in self.reader.tensors:
            if tensor.name == "rope_freqs.weight":
                continue  # recomputed from the rope settings, as transformers does
            name = _GGUF_GLOBAL.get(tensor.name)
            kind = tensor.name.rsplit(".", 1)[0]
            if name is None:
                parts = tensor.name.split(".")
                kind = ".".join(["blk", "{bid}", *parts[2:-1]])
                module = by_kind.get(kind) if parts[0] == "blk" else None
                if module is None or parts[-1] not in ("weight", "bias"):
                    raise EdgepruneError(f"{path} has tensor {tensor.name}, which edgeprune does not map: it reads "
                                         f"{writer.arch_name} GGUFs with the tensors llama.cpp's converter writes")
                name = f"model.layers.{parts[1]}.{module}.{parts[-1]}"
            self.tensors[name] = tensor
            if kind in norms and writer.norm_offset:
                self.offsets[name] = writer.norm_offset

    def names(self) -> set[str]:
        return set(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensor(name).shape))

    def stored_bytes(self) -> int:
        return sum(int(t.n_bytes) for t in self.tensors.values())

    def load(self, name: str) -> torch.Tensor:
        import gguf

        tensor = self._tensor(name)
        weights = gguf.dequantize(tensor.data, tensor.tensor_type)
        heads = {"q_proj": self.n_head, "k_proj": self.n_head_kv}.get(name.split(".")[-2])
        if heads and self.rope_permuted:
            weights = _unpermute(weights, heads)
        return torch.from_numpy(np.copy(weights)).to(torch.float32) - self.offsets.get(name, 0.0)

    def rows(self, name: str, index: np.ndarray) -> torch.Tensor:
        import gguf

        tensor = self._tensor(name)
        picked = np.ascontiguousarray(tensor.data[index])  # rows of whole quant blocks
        return torch.from_numpy(np.copy(gguf.dequantize(picked, tensor.tensor_type))).to(torch.float32)

    def _tensor(self, name: str):
        if name not in self.tensors:
            raise EdgepruneError(f"the GGUF has no tensor for {name}: it does not match its own metadata")
        return self.tensors[name]


def _unpermute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's interleaved RoPE rows back to transformers' rotate-half layout (transformers' own inverse)."""
    dim = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, dim, 2, *weights.shape[1:]).swapaxes(2, 1).reshape(weights.shape)
