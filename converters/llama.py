"""`llama` architecture: every layer has the same shape, so the widths are single numbers."""

from __future__ import annotations

import gguf

from edgeprune.core.shapes import ModelShape

from .base import ModelWriter
from .config import INERT, MAPPED, Only

# Every config.json field LlamaConfig and MistralConfig read (model_type llama, mistral), and what the GGUF does
# with it (converters.config.check_config_fields; tests/test_config_fields.py checks that the table covers them).
CONFIG_FIELDS = {
    # the shapes: read from the weights (edgeprune.core.shapes) and written as the architecture's keys and tensors
    **dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "attention_bias", "mlp_bias", "tie_word_embeddings"), MAPPED),
    # context_length (absent: transformers' default for the class), the norm epsilon, rope base and scaling
    # (converters.rope.check_rope_scaling refuses what llama.cpp cannot run)
    **dict.fromkeys(("max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters"),
                    MAPPED),
    # tokenizer.ggml.*_token_id, through gguf-py's SpecialVocab, which reads config.json as llama.cpp's converter does
    **dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"), MAPPED),
    "hidden_act": Only(("silu",), "llama.cpp's graph gates the FFN with SiLU"),
    # dropout, initialisation and the KV-cache switch act in training only; pretraining_tp > 1 only splits the same
    # matrix products into slices (transformers 4; 5 ignores it)
    **dict.fromkeys(("attention_dropout", "initializer_range", "use_cache", "pretraining_tp"), INERT),
    # every config's own bookkeeping and output switches; chunk_size_feed_forward computes the same FFN in chunks,
    # the label maps and problem_type serve classification heads, which a causal LM has none of
    **dict.fromkeys(("transformers_version", "architectures", "output_hidden_states", "return_dict", "dtype",
                     "torch_dtype", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id",
                     "problem_type", "model_type"), INERT),
    # Mistral's window: not applied by llama.cpp or its converter (README); it changes nothing within the window
    "sliding_window": INERT,
    "quantization_config": Only((), "a quantized checkpoint; edgeprune reads float weights: give the unquantized model"),
}


class LlamaWriter(ModelWriter):
    arch = gguf.MODEL_ARCH.LLAMA
    config_fields = CONFIG_FIELDS

    @staticmethod
    def can_hold(shape: ModelShape) -> bool:
        return shape.is_uniform

    def add_shape_parameters(self, writer: gguf.GGUFWriter) -> None:
        layer = self.shape.layers[0]
        writer.add_head_count(layer.n_head)
        writer.add_head_count_kv(layer.n_head_kv)
        writer.add_feed_forward_length(layer.n_ff)
