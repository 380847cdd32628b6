"""GGUF converters: a torch Llama model plus its vocab becomes a `llama` or `deci` GGUF.

`write_gguf` picks the architecture from the model's per-layer shape: `llama` when every layer is alike
(every runtime loads it), `deci` when widths differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgeprune.shapes import shape_of

from .base import OUTPUT_TYPES, ConversionInput, ModelWriter, gguf_tensor_name
from .deci import DeciWriter
from .llama import LlamaWriter
from .vocab import Vocab, vocab_from_gguf, vocab_from_hf_dir

WRITERS: dict[str, type[ModelWriter]] = {"llama": LlamaWriter, "deci": DeciWriter}


def write_gguf(source: ConversionInput, path: str | Path, out_type: str = "F16",
               progress: Callable[[str], None] | None = None) -> Path:
    shape = shape_of(source.model)
    return WRITERS[shape.architecture](source, shape).write(path, out_type, progress)


__all__ = [
    "ConversionInput", "OUTPUT_TYPES", "Vocab", "WRITERS", "gguf_tensor_name", "vocab_from_gguf",
    "vocab_from_hf_dir", "write_gguf",
]
