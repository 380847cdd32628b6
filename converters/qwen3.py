"""`qwen3` architecture (llama.cpp's src/models/qwen3.cpp): Qwen2 without biases, with a per-head RMSNorm on
q and k (`attn_q_norm`, `attn_k_norm`, head_dim wide, shared by every head) before NEOX rope.

The loader creates every layer's tensors from layer 0's widths (`n_head = hparams.n_head()`, `n_ff =
hparams.n_ff()` in LLAMA_LOAD_LOCALS) and no o/down bias, and neither `llama` nor `deci` has the q/k norms: a
Qwen3 is written as `qwen3` or not at all, so it is pruned to uniform widths without output biases.
"""

from __future__ import annotations

import gguf

from edgeprune.core.shapes import ModelShape

from .base import LAYER_TENSORS, QK_NORM_TENSORS
from .config import Only
from .qwen2 import CONFIG_FIELDS as QWEN2_FIELDS
from .qwen2 import Qwen2Writer

# Qwen3Config's fields: Qwen2's, and attention_bias, which would add an o_proj bias llama.cpp's qwen3 graph lacks.
CONFIG_FIELDS = {
    **QWEN2_FIELDS,
    "attention_bias": Only((False,), "llama.cpp's qwen3 graph has no attention output bias"),
}


def with_qk_norms(tensors: dict) -> dict:
    """A layer's tensor table with the q/k norms after the k projection, where llama.cpp's converter puts them."""
    at = list(tensors).index("self_attn.k_proj") + 1
    items = list(tensors.items())
    return dict(items[:at] + list(QK_NORM_TENSORS.items()) + items[at:])


class Qwen3Writer(Qwen2Writer):
    arch = gguf.MODEL_ARCH.QWEN3
    config_fields = CONFIG_FIELDS
    tensor_table = with_qk_norms(LAYER_TENSORS)

    @staticmethod
    def can_hold(shape: ModelShape) -> bool:
        return shape.is_uniform and not any(
            l.attn_output_bias or l.ffn_down_bias or l.ffn_gate_up_bias for l in shape.layers)
