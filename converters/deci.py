"""`deci` architecture (llama.cpp's src/models/deci.cpp): the same tensors as `llama`, per-layer widths.

llama.cpp honours per-layer arrays here. A layer with n_head == 0 has no attention. n_ff == 0 would make
llama.cpp skip the whole layer, attention included, so the writer refuses it.
"""

from __future__ import annotations

import gguf

from edgeprune.core.errors import EdgepruneError
from edgeprune.core.shapes import ModelShape

from .base import ModelWriter


class DeciWriter(ModelWriter):
    arch = gguf.MODEL_ARCH.DECI

    @staticmethod
    def can_hold(shape: ModelShape) -> bool:
        return True

    def add_shape_parameters(self, writer: gguf.GGUFWriter) -> None:
        layers = self.shape.layers
        if layers[0].n_head == 0:
            raise EdgepruneError("layer 0 has no attention, which llama.cpp's deci loader rejects: keep layer 0's heads")
        if any(l.n_ff == 0 for l in layers):
            raise EdgepruneError("a layer has n_ff = 0, which llama.cpp's deci runtime mishandles: keep a small FFN or drop the layer")
        # gguf-py accepts plain Python ints only in arrays
        writer.add_head_count([int(l.n_head) for l in layers])
        writer.add_head_count_kv([int(l.n_head_kv) for l in layers])
        writer.add_feed_forward_length([int(l.n_ff) for l in layers])
