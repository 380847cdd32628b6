"""`gemma3` architecture (llama.cpp's src/models/gemma3.cpp): the text model of Gemma 3.

What it does differently from Llama, and where each goes:
- RMSNorm multiplies by 1 + w: every norm weight is stored as w + 1 (`norm_offset`), as llama.cpp's converter does.
- Four norms per layer: before and after attention (`attn_norm`, `post_attention_norm`), before and after the FFN
  (`ffn_norm`, `post_ffw_norm`); per-head q/k norms as Qwen3's.
- The embedding is scaled by sqrt(hidden) and the FFN gated by GELU-tanh: both fixed in llama.cpp's graph.
- Sliding-window attention on five layers in six, with their own rope base: `attention.sliding_window`, the
  per-layer pattern as an array when it is not llama.cpp's default of every sixth layer global (after layer
  removal), and `rope.freq_base_swa`.
- Queries are scaled by 1/sqrt(head_dim) in llama.cpp (but for its 62-layer 27B): query_pre_attn_scalar must be
  head_dim. Logit soft-capping is written when set; attention soft-capping is refused (Gemma 2's, not run).

The loader creates every layer's tensors from layer 0's widths (`n_ff`, `n_head` in LLAMA_LOAD_LOCALS) with no
o/down bias, so a pruned Gemma 3 keeps uniform widths and no output biases.
"""

from __future__ import annotations

from dataclasses import replace

import gguf

from edgeprune.core.errors import EdgepruneError
from edgeprune.core.shapes import DEFAULT_SWA_PATTERN, ModelShape, swa_pattern

from .base import LAYER_TENSORS, T
from .config import INERT, MAPPED, Only
from .llama import CONFIG_FIELDS as LLAMA_FIELDS
from .llama import LlamaWriter
from .qwen3 import with_qk_norms
from .rope import layer_type_rope

# llama.cpp's sliding layers' rope base when the GGUF does not say (llama-hparams.h rope_freq_base_train_swa)
DEFAULT_SWA_BASE = 10000.0

# Gemma3TextConfig's fields
CONFIG_FIELDS = {
    **{name: handling for name, handling in LLAMA_FIELDS.items()
       if name not in ("attention_bias", "mlp_bias", "pretraining_tp", "sliding_window", "hidden_act")},
    "attention_bias": Only((False,), "llama.cpp's gemma3 graph has no attention output bias"),
    "hidden_activation": Only(("gelu_pytorch_tanh",), "llama.cpp's gemma3 graph gates the FFN with GELU-tanh"),
    "use_bidirectional_attention": Only((False,), "llama.cpp's gemma3 graph is causal (the bidirectional one is "
                                                  "EmbeddingGemma's)"),
    "attn_logit_softcapping": Only((), "llama.cpp's gemma3 graph does not soft-cap attention logits"),
    # the window, the per-layer pattern, the logit soft-cap and the query scale (checked against head_dim)
    **dict.fromkeys(("sliding_window", "layer_types", "final_logit_softcapping", "query_pre_attn_scalar"), MAPPED),
    "attention_dropout": INERT,
}


def check_query_scale(config: dict, where: str) -> None:
    """llama.cpp scales queries by 1/sqrt(head_dim); Gemma 3 scales by 1/sqrt(query_pre_attn_scalar)."""
    head_dim, scalar = config.get("head_dim"), config.get("query_pre_attn_scalar")
    if head_dim is not None and scalar is not None and scalar != head_dim:
        raise EdgepruneError(f"{where} sets query_pre_attn_scalar = {scalar}, not head_dim {head_dim}: llama.cpp's "
                             "gemma3 graph scales queries by 1/sqrt(head_dim), so it would compute another model")


class Gemma3Writer(LlamaWriter):
    arch = gguf.MODEL_ARCH.GEMMA3
    config_fields = CONFIG_FIELDS
    rope_permuted = False
    norm_offset = 1.0
    tensor_table = {
        "input_layernorm": T.ATTN_NORM,
        **{m: k for m, k in with_qk_norms(LAYER_TENSORS).items() if m.startswith("self_attn.")},
        "post_attention_layernorm": T.ATTN_POST_NORM, "pre_feedforward_layernorm": T.FFN_NORM,
        **{m: k for m, k in LAYER_TENSORS.items() if m.startswith("mlp.")},
        "post_feedforward_layernorm": T.FFN_POST_NORM,
    }

    @staticmethod
    def can_hold(shape: ModelShape) -> bool:
        return shape.is_uniform and not any(
            l.attn_output_bias or l.ffn_down_bias or l.ffn_gate_up_bias for l in shape.layers)

    def add_dimension_keys(self, writer: gguf.GGUFWriter) -> None:
        writer.add_key_length(self.shape.head_dim)
        writer.add_value_length(self.shape.head_dim)

    def add_shape_parameters(self, writer: gguf.GGUFWriter) -> None:
        super().add_shape_parameters(writer)
        c = self.config
        check_query_scale({"head_dim": self.shape.head_dim, "query_pre_attn_scalar": c.query_pre_attn_scalar},
                          "the model's config")
        if getattr(c, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(c.final_logit_softcapping))
        sliding = [kind == "sliding_attention" for kind in c.layer_types[:self.shape.n_layers]]
        if not any(sliding):
            return  # llama.cpp runs every layer globally when the GGUF names no window
        writer.add_sliding_window(int(c.sliding_window))
        if sliding != swa_pattern(DEFAULT_SWA_PATTERN, self.shape.n_layers):
            writer.add_sliding_window_pattern(sliding)
        swa = layer_type_rope(c, "sliding_attention")
        if str(swa.get("rope_type") or "default") != "default":
            raise EdgepruneError(f"the model scales the sliding layers' rope ({swa['rope_type']}): llama.cpp's gemma3 "
                                 "graph scales only the global layers'")
        writer.add_rope_freq_base_swa(float(swa.get("rope_theta", DEFAULT_SWA_BASE)))

    def vocab(self):
        """Gemma's SentencePiece tokenizer adds no space prefix (llama.cpp's converter writes it so)."""
        vocab = super().vocab()
        if vocab.model == "llama" and vocab.add_space_prefix is None:
            return replace(vocab, add_space_prefix=False)
        return vocab
