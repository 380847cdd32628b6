"""The layer-streamed route (edgeprune.build.streaming): the model opened, not loaded; each decoder layer read,
pruned, calibrated and written in one pass, so that a model larger than this machine's memory goes through."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from converters import ConversionInput

from edgeprune.build.loading import open_model
from edgeprune.build.pipeline.options import Progress
from edgeprune.build.pipeline.stages import Chosen, FloatModel, Run
from edgeprune.build.streaming import LazyLayers, conversion_input, lazy_shape, stream_write


class Streamed:
    """The model read layer by layer: shape, write float and calibrate are one pass; no recovery (distillation
    trains the whole model in memory). The pruning calibrates on as many sequences as the importance matrix
    (ExportOptions.calib_sequences)."""

    can_recover = False

    def load(self, prepared, model_path: str | Path, say: Progress) -> tuple[object, object]:
        loaded = prepared.timed("load", open_model, model_path, progress=say)
        return loaded, lazy_shape(loaded)

    def conversion_input(self, loaded, metadata: dict[str, str], model=None) -> ConversionInput:
        return conversion_input(loaded, metadata)

    def write_reference(self, prepared, path: Path, metadata: dict[str, str], say: Progress) -> Path:
        return prepared.timed("write_reference", stream_write, prepared.loaded, path, metadata,
                              device=prepared.device(), progress=say).gguf

    def calibration_model(self, prepared):
        return LazyLayers(prepared.loaded, prepared.device())

    def float_model(self, run: Run, chosen: Chosen, float_gguf: Path) -> FloatModel:
        prepared, options = run.prepared, run.prepared.options
        prune = chosen.prune and dataclasses.replace(chosen.prune, calib_sequences=options.calib_sequences)
        build = stream_write(prepared.loaded, float_gguf, run.metadata, token_ids=prepared.tokens, options=prune,
                             device=prepared.device(), progress=run.say,
                             imatrix=(options.calib_sequences, options.calib_seq_len, prepared.calib.name)
                             if chosen.use_imatrix else None)
        prepared.timings.update(build.seconds)
        return FloatModel(float_gguf, build.pruning, build.stats.gguf_imatrix() if build.stats else None)
