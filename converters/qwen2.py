"""`qwen2` architecture (llama.cpp's src/models/qwen2.cpp): Llama's tensors plus q/k/v biases, with NEOX rope,
so q/k rows keep transformers' order.

llama.cpp's qwen2 loader fixes q and o at n_embd wide, reads one n_ff for every layer and has no o/down (or
gate/up) biases. So it holds an unpruned Qwen2, and a pruned one only when nothing but uniform FFN widths
changed without recovery biases; any other pruned Qwen2 is written as `llama` or `deci`, q/k rows permuted for
their NORM rope, which computes the same.
"""

from __future__ import annotations

import gguf

from edgeprune.core.shapes import ModelShape

from .config import INERT, Only
from .llama import CONFIG_FIELDS as LLAMA_FIELDS
from .llama import LlamaWriter

# Qwen2Config's fields: Llama's (its q/k/v biases are fixed, not a field), and the sliding window, which
# llama.cpp's qwen2 graph does not have: refused when on, inert when off.
CONFIG_FIELDS = {
    **{name: handling for name, handling in LLAMA_FIELDS.items()
       if name not in ("attention_bias", "mlp_bias", "pretraining_tp", "sliding_window")},
    "use_sliding_window": Only((False,), "llama.cpp's qwen2 graph attends to the whole context"),
    **dict.fromkeys(("sliding_window", "max_window_layers"), INERT),  # read only with use_sliding_window
    "layer_types": Only(("full_attention",), "llama.cpp's qwen2 graph attends to the whole context", each=True),
}


class Qwen2Writer(LlamaWriter):
    arch = gguf.MODEL_ARCH.QWEN2
    rope_permuted = False
    config_fields = CONFIG_FIELDS

    @staticmethod
    def can_hold(shape: ModelShape) -> bool:
        return shape.is_uniform and all(
            l.n_head * shape.head_dim == shape.hidden_size and l.attn_qkv_bias and not l.attn_output_bias
            and not l.ffn_down_bias and not l.ffn_gate_up_bias for l in shape.layers)

    def add_dimension_keys(self, writer: gguf.GGUFWriter) -> None:
        """As llama.cpp's converter writes a Qwen2: no vocab_size or rope.dimension_count, and the head size only
        when config.json names head_dim (llama.cpp derives it otherwise)."""
        if getattr(self.config, "head_dim", None) is not None:
            writer.add_key_length(self.shape.head_dim)
            writer.add_value_length(self.shape.head_dim)
