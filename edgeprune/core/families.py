"""Model families: which config.json `model_type`s edgeprune reads, the transformers classes that run them,
and the llama.cpp architecture a GGUF of the family is read from.

Every family here has Llama's module tree (model.layers.N.self_attn.q_proj, …, mlp.down_proj), so pruning,
calibration and the converter's tensor names are shared; a family differs in its classes, in the norms around
them (Qwen3's and Gemma 3's per-head q/k norms, Gemma 3's norms after each sub-layer) and in how llama.cpp
stores it (converters.writer_class).
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
    config_class: str = ""  # when not <prefix>Config: Gemma3Config is the multimodal one, the text model's differs
    output_biases: bool = True  # llama.cpp's graph adds o_proj/down_proj biases (recovery may fit them)
    scaled_embedding: bool = False  # the embedding's rows are multiplied by sqrt(hidden_size) (Gemma)

    def transformers_class(self, kind: str):
        """kind: Config, ForCausalLM, DecoderLayer, RotaryEmbedding or RMSNorm."""
        if kind == "Config" and self.config_class:
            return getattr(importlib.import_module("transformers"), self.config_class)
        modeling = importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")
        return getattr(modeling, self.class_prefix + kind)


# Mistral is Llama's network under another name: llama.cpp's converter writes it as `llama` too (its sliding
# window, like llama.cpp's, is not applied: it matters only past 4096 tokens in Mistral-7B-v0.1 and is off in
# later ones). Qwen2/Qwen2.5 is Llama with q/k/v biases and NEOX rope. Qwen3 drops the biases and adds q/k
# norms; llama.cpp's qwen3 and gemma3 graphs take no o_proj/down_proj bias (src/models/qwen3.cpp, gemma3.cpp).
FAMILIES = (
    Family("llama", "Llama", ("llama", "mistral"), "llama"),
    Family("qwen2", "Qwen2", ("qwen2",), "qwen2"),
    Family("qwen3", "Qwen3", ("qwen3",), "qwen3", output_biases=False),
    Family("gemma3", "Gemma3", ("gemma3_text",), "gemma3", config_class="Gemma3TextConfig", output_biases=False,
           scaled_embedding=True),
)
MODEL_TYPES = tuple(t for family in FAMILIES for t in family.model_types)
# Near relatives a user may arrive with, refused by their own name: each differs in what llama.cpp runs.
MULTIMODAL = {"gemma3": "a Gemma 3 multimodal checkpoint (Gemma3ForConditionalGeneration, with a vision tower): "
                        "edgeprune exports text models only; give a text-only Gemma 3 (model_type 'gemma3_text', "
                        "e.g. gemma-3-270m or gemma-3-1b)"}
RELATIVES = {
    "gemma": "Gemma 1", "gemma2": "Gemma 2", "gemma3n": "Gemma 3n", "gemma3n_text": "Gemma 3n", "gemma4": "Gemma 4",
    "gemma4_text": "Gemma 4", "qwen3_moe": "Qwen3-MoE", "qwen3_next": "Qwen3-Next", "qwen3_5": "Qwen3.5",
    "qwen3_5_text": "Qwen3.5", "qwen3_5_moe": "Qwen3.5-MoE", "qwen2_moe": "Qwen2-MoE", "smollm3": "SmolLM3",
}


def family_for_model_type(model_type: str | None, where: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = f"edgeprune supports model_type {', '.join(repr(t) for t in MODEL_TYPES)}"
    if model_type in MULTIMODAL:
        raise EdgepruneError(f"{where} is {MULTIMODAL[model_type]}")
    relative = RELATIVES.get(str(model_type))
    named = f"a {relative} model ({model_type!r})" if relative else f"a {model_type!r} model"
    raise EdgepruneError(f"{where} holds {named}, which edgeprune does not support: {supported}")


def family_of(config) -> Family:
    """The family of a transformers config (a Mistral checkpoint is loaded through LlamaConfig)."""
    return family_for_model_type(getattr(config, "model_type", "llama"), "the model")


def family_for_gguf(architecture: str, where: str) -> Family:
    for family in FAMILIES:
        if family.gguf_arch == architecture:
            return family
    raise EdgepruneError(f"{where} is a {architecture!r} GGUF: edgeprune reads "
                         f"{', '.join(f.gguf_arch for f in FAMILIES)} GGUFs (or a Hugging Face directory)")
