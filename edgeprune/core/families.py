"""Model families: which config.json `model_type`s edgeprune reads, the transformers classes that run them,
and the llama.cpp architecture a GGUF of the family is read from.

Every family here has Llama's module tree (model.layers.N.self_attn.q_proj, …, mlp.down_proj), so pruning,
calibration and the converter's tensor names are shared; a family differs only in its classes and in how
llama.cpp stores it (converters.writer_class).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from edgeprune.core.errors import EdgepruneError


@dataclass(frozen=True)
class Family:
    module: str  # transformers.models.<module>.modeling_<module>
    class_prefix: str  # e.g. "Qwen2" for Qwen2ForCausalLM, Qwen2DecoderLayer, …
    model_types: tuple[str, ...]  # config.json model_type values run by these classes
    gguf_arch: str  # the llama.cpp architecture whose GGUFs are read back as this family
    rope_permuted_in_gguf: bool  # llama's NORM rope stores q/k rows interleaved; NEOX (qwen2) keeps HF's order

    def transformers_class(self, kind: str):
        """kind: Config, ForCausalLM, DecoderLayer, RotaryEmbedding or RMSNorm."""
        modeling = importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")
        return getattr(modeling, self.class_prefix + kind)


# Mistral is Llama's network under another name: llama.cpp's converter writes it as `llama` too (its sliding
# window, like llama.cpp's, is not applied: it matters only past 4096 tokens in Mistral-7B-v0.1 and is off in
# later ones). Qwen2/Qwen2.5 is Llama with q/k/v biases and NEOX rope.
FAMILIES = (
    Family("llama", "Llama", ("llama", "mistral"), "llama", True),
    Family("qwen2", "Qwen2", ("qwen2",), "qwen2", False),
)
MODEL_TYPES = tuple(t for family in FAMILIES for t in family.model_types)


def family_for_model_type(model_type: str | None, where: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise EdgepruneError(f"{where} holds a {model_type!r} model: edgeprune supports model_type "
                         f"{', '.join(repr(t) for t in MODEL_TYPES)}")


def family_of(config) -> Family:
    """The family of a transformers config (a Mistral checkpoint is loaded through LlamaConfig)."""
    return family_for_model_type(getattr(config, "model_type", "llama"), "the model")


def family_for_gguf(architecture: str, where: str) -> Family:
    for family in FAMILIES:
        if family.gguf_arch == architecture:
            return family
    raise EdgepruneError(f"{where} is a {architecture!r} GGUF: edgeprune reads "
                         f"{', '.join(f.gguf_arch for f in FAMILIES)} GGUFs (or a Hugging Face directory)")
