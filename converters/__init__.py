"""GGUF converters: a torch Llama-family model plus its vocab becomes a `llama`, `qwen2`, `qwen3`, `gemma3` or
`deci` GGUF.

`writer_class` picks the architecture from the model's family and per-layer shape: the family's own (`qwen2`)
when llama.cpp's loader for it can hold the shape, else `llama` when every layer is alike (every runtime loads
it), else `deci`. Qwen3 and Gemma 3 have norms neither `llama` nor `deci` holds: their own architecture or none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgeprune.core.errors import EdgepruneError
from edgeprune.core.families import family_for_model_type, family_of
from edgeprune.core.shapes import ModelShape, shape_of

from .base import OUTPUT_TYPES, ConversionInput, ModelWriter, gguf_tensor_name
from .config import check_config_fields, config_defaults
from .deci import DeciWriter
from .gemma3 import Gemma3Writer, check_query_scale
from .llama import LlamaWriter
from .qwen2 import Qwen2Writer
from .qwen3 import Qwen3Writer
from .vocab import Vocab, vocab_from_gguf, vocab_from_hf_dir

# The writers a model of each family may take, first choice first (the first that can hold its shape).
WRITERS: dict[str, tuple[type[ModelWriter], ...]] = {
    "llama": (LlamaWriter, DeciWriter),
    "qwen2": (Qwen2Writer, LlamaWriter, DeciWriter),
    "qwen3": (Qwen3Writer,),
    "gemma3": (Gemma3Writer,),
}


def writer_class(config, shape: ModelShape) -> type[ModelWriter]:
    check_config(config.to_dict(), "the model's config")
    family = family_of(config)
    writer = next((w for w in WRITERS[family.module] if w.can_hold(shape)), None)
    if writer is None:
        raise EdgepruneError(f"llama.cpp's {family.gguf_arch} architecture holds uniform layer widths without "
                             f"output biases: prune {family.class_prefix} with --allocation uniform and recovery "
                             "that fits no bias")
    return writer


def per_layer_widths(config) -> bool:
    """Whether a pruned model of this family may have per-layer widths (a `deci` GGUF). Qwen3's and Gemma 3's
    norms exist only in their own architectures, whose loaders create every layer at layer 0's widths."""
    return DeciWriter in WRITERS[family_of(config).module]


def family_writer(family) -> type[ModelWriter]:
    """The writer of a family's own llama.cpp architecture: how its GGUFs store the tensors."""
    return WRITERS[family.module][0]


def check_config(config: dict, where: str) -> None:
    """config.json (or a transformers config's dict) field by field, against its family's table."""
    model_type = config.get("model_type")
    fields = family_writer(family_for_model_type(model_type, where)).config_fields
    check_config_fields(config, fields, config_defaults(model_type), where)
    check_query_scale(config, where)


def write_gguf(source: ConversionInput, path: str | Path, out_type: str = "F16",
               progress: Callable[[str], None] | None = None) -> Path:
    shape = shape_of(source.model)
    return writer_class(source.config, shape)(source, shape).write(path, out_type, progress)


__all__ = [
    "ConversionInput", "OUTPUT_TYPES", "Vocab", "WRITERS", "check_config", "family_writer", "gguf_tensor_name", "per_layer_widths", "vocab_from_gguf",
    "vocab_from_hf_dir", "write_gguf", "writer_class",
]
