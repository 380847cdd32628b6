"""Measured search (`--search measured`): build the planner's best few candidates and let llama.cpp pick.

The planner ranks candidates by a quality table measured on one model; another model can order them
differently. Here each of the top feasible candidates is really pruned, written, quantized with an imatrix
and scored by llama.cpp on the tail of the calibration text, which the calibration pass never reads (it
takes its sequences from the start). The candidate with the lowest measured Δ log PPL against the dense F16
model wins. Budgets are not re-judged: every candidate measured already meets them by prediction.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from converters import ConversionInput, write_gguf

from edgeprune.build.calibration import collect_calibration
from edgeprune.core.errors import EdgepruneError
from edgeprune.build.loading import LoadedModel
from edgeprune.build.planner import Evaluated, Plan
from edgeprune.build.quantize import quantize_gguf
from edgeprune.core.texts import Text
from edgeprune.device.validation.quality import measure_perplexity

HELD_OUT_FRACTION = 0.2  # the tail of the calibration text scored here; calibration reads far less than 80%
SEARCH_CHUNKS = 4  # 512-token chunks scored per candidate: enough to order candidates, cheap to repeat
IMATRIX_SEQUENCES = 16


@dataclass(frozen=True)
class MeasuredLoss:
    label: str
    estimated_loss: float  # Δ log PPL from the quality table
    measured_loss: float  # Δ log PPL measured by llama.cpp against the dense F16 model
    ppl: float


def held_out_text(calibration: Text) -> Text:
    """The last HELD_OUT_FRACTION of the calibration text, which the calibration pass does not read."""
    content = calibration.content
    return Text(f"{calibration.name} (held-out tail)", content[int(len(content) * (1 - HELD_OUT_FRACTION)):])


def measured_plan(plan: Plan, loaded: LoadedModel, tokens: list[int], calibration: Text, *, top: int = 3,
                  threads: int, progress: Callable[[str], None]) -> Plan:
    """`plan` with its choice replaced by the least lossy, as measured, of its `top` best feasible candidates."""
    if top < 1:
        raise EdgepruneError(f"measured_plan(top={top}): measure at least one candidate")
    text = held_out_text(calibration)
    contenders = [plan.chosen, *plan.runners_up][:top]
    with tempfile.TemporaryDirectory(prefix="edgeprune-search-") as tmp:
        source = ConversionInput(loaded.model, loaded.vocab, loaded.name, loaded.context_length)
        dense_path = write_gguf(source, Path(tmp) / "dense-F16.gguf", "F16")
        dense_ppl = _ppl(dense_path, text, threads, progress)
        measured = []
        for i, contender in enumerate(contenders):
            label = contender.candidate.label(plan.base)
            progress(f"search: building candidate {i + 1}/{len(contenders)}: {label}")
            ppl = _ppl(_build(contender, plan, loaded, tokens, Path(tmp), progress), text, threads, progress)
            measured.append(MeasuredLoss(label, contender.quality_loss, math.log(ppl / dense_ppl), ppl))
            progress(f"search: {label}: PPL {ppl:.3f} (dense {dense_ppl:.3f})")
    best = min(range(len(contenders)), key=lambda i: measured[i].measured_loss)
    others = [c for j, c in enumerate(contenders) if j != best]
    return dataclasses.replace(plan, chosen=contenders[best], runners_up=others + plan.runners_up[top - 1:],
                               measured=measured)


def _build(contender: Evaluated, plan: Plan, loaded: LoadedModel, tokens: list[int], tmp: Path, progress) -> Path:
    """The candidate as its final GGUF: pruned, written as F16, quantized with an imatrix of its own."""
    candidate = contender.candidate
    model = loaded.model
    options = candidate.prune_options(plan.base)
    if options is not None:
        from edgeprune.build.pruning import prune_model

        model = prune_model(copy.deepcopy(loaded.model), tokens, options, progress=progress).model
    source = ConversionInput(model, loaded.vocab, loaded.name, loaded.context_length)
    float_path = write_gguf(source, tmp / "candidate-F16.gguf", "F16")
    if candidate.quant == "F16":
        return float_path
    stats = collect_calibration(model, tokens, n_seq=IMATRIX_SEQUENCES, progress=progress)
    imatrix = stats.gguf_imatrix()
    return quantize_gguf(float_path, tmp / "candidate.gguf", candidate.quant, imatrix=imatrix, progress=progress).path


def _ppl(path: Path, text: Text, threads: int, progress) -> float:
    return measure_perplexity(path, text, max_chunks=SEARCH_CHUNKS, threads=threads, progress=progress)[0].ppl
