"""`llama` architecture: every layer has the same shape, so the widths are single numbers."""

from __future__ import annotations

import gguf

from edgeprune.shapes import ModelShape

from .base import ModelWriter


class LlamaWriter(ModelWriter):
    arch = gguf.MODEL_ARCH.LLAMA

    @staticmethod
    def can_hold(shape: ModelShape) -> bool:
        return shape.is_uniform

    def add_shape_parameters(self, writer: gguf.GGUFWriter) -> None:
        layer = self.shape.layers[0]
        writer.add_head_count(layer.n_head)
        writer.add_head_count_kv(layer.n_head_kv)
        writer.add_feed_forward_length(layer.n_ff)
