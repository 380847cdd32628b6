"""`edgeprune plan` as a function: a model's plan for a profile, estimated from its shapes alone, or measured by
building and scoring the best few candidates."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from converters import ConversionInput

from edgeprune.build.loading import load_model, open_model
from edgeprune.build.planner import Plan, check_search_options, make_plan
from edgeprune.build.streaming import conversion_input, lazy_shape
from edgeprune.core.shapes import shape_of
from edgeprune.core.texts import calibration_text
from edgeprune.device.llamacpp.quantizer import check_quant_type


def plan_model(model: Path, profile, *, quants: tuple[str, ...] = (), mix: bool = False, search: str = "estimated",
               calib: Path | None = None, threads: int | None = None, allow_pickle: bool = False,
               progress: Callable[[str], None] = lambda _line: None) -> tuple[Plan, str]:
    """The plan for `model` on `profile` and the model's name. Only --search measured (or pickle weights, which
    cannot be opened lazily) reads the weights; otherwise the shapes, config and vocab are enough, whatever the
    model's size."""
    quants = tuple(check_quant_type(q) for q in quants) or None
    check_search_options(search, mix, profile)
    calibration = calibration_text(calib)
    if search == "measured" or allow_pickle:  # candidates are built from the whole model in memory
        loaded = load_model(model, allow_pickle=allow_pickle, progress=progress)
        source, shape = ConversionInput(loaded.model, loaded.vocab, loaded.name, loaded.context_length), \
            shape_of(loaded.model)
    else:  # the plan needs the shapes, config and vocab only: no weight is read, whatever the model's size
        loaded = open_model(model, progress=progress)
        source, shape = conversion_input(loaded, {}), lazy_shape(loaded)
    result = make_plan(source, shape, profile, quants=quants, mixed=mix, progress=progress)
    if search == "measured":
        from edgeprune.build.search import measured_plan

        tokens = loaded.tokenizer(calibration.content, add_special_tokens=False)["input_ids"]
        result = measured_plan(result, loaded, tokens, calibration, threads=threads or os.cpu_count() or 1,
                               progress=progress)
    return result, loaded.name
