"""What the stages of one output hand on to each other, and the contract of the two paths through them.

One output of a prepared model goes plan → shape (prune, recover) → write float → calibrate → quantize (mix) →
validate → bundle → report (`edgeprune.build.pipeline.output`). The model is either in memory or read layer by
layer (`inmemory`, `streamed`): a `Route` each, chosen once from the resources (`Prepared.route`). The in-memory
route shapes, writes and calibrates one after the other; the layer-streamed one does all three in one pass over
the layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from converters import ConversionInput

from edgeprune.build.pipeline.options import Progress
from edgeprune.build.planner import Plan
from edgeprune.device.profiles import Profile
from edgeprune.build.quantize import QuantizeResult
from edgeprune.device.validation.results import ValidationReport

if TYPE_CHECKING:
    from edgeprune.build.mixed import MixedPlan
    from edgeprune.build.pipeline.prepared import Prepared


@dataclass
class Run:
    """One output being built: of which prepared model, for which profile (None: nothing planned or validated),
    into which directory. Every file it creates is appended to `written` first, for the caller's cleanup (files
    an earlier run left under the same names are not this run's to remove)."""

    prepared: Prepared
    profile: Profile | None
    out_dir: Path
    say: Progress
    written: list[Path]
    metadata: dict[str, str]  # the edgeprune.* keys of every GGUF written (`options.provenance`)
    threads: int  # quantization runs here, on this machine's cores


@dataclass
class Chosen:
    """The plan stage's choice: what the output is."""

    plan: Plan | None  # None: nothing planned (no profile, or the pruning given)
    quant: str
    prune: object | None  # edgeprune.build.pruning.PruneOptions; None: not pruned
    mixing: bool  # a type per tensor (edgeprune.build.mixed)
    distillation: object | None  # edgeprune.build.pruning.distill.DistillOptions; None: no recovery
    use_imatrix: bool


@dataclass
class Files:
    """The output's names."""

    stem: str  # the input's name (`options.output_stem`)
    final: Path  # the GGUF the output is
    float_gguf: Path  # where the float model is written: `final` itself for an F16 output


@dataclass
class FloatModel:
    """The shaped model as a float GGUF, what pruning did to it and its importance matrix."""

    gguf: Path  # `Files.float_gguf`, or the F16 reference of an unpruned model
    pruning: dict | None  # report.json's "pruning"; None: not pruned
    imatrix: dict | None  # None: quantized without one


@dataclass
class Quantized:
    result: QuantizeResult | None  # None for an F16 output
    mix: MixedPlan | None  # the types chosen per tensor; None: one type


@dataclass
class Validated:
    report: ValidationReport
    partial: Path  # the validation bundle being written, holding the reference's top-k log-probs


class Route(Protocol):
    """One way through the stages that touch the model's weights."""

    can_recover: bool  # distillation trains the whole model in memory

    def load(self, prepared: Prepared, model_path: str | Path, say: Progress) -> tuple[object, object]:
        """The model (LoadedModel or LazyModel) and its shape (ModelShape)."""

    def conversion_input(self, loaded, metadata: dict[str, str], model=None) -> ConversionInput:
        """What the GGUF writer reads: `model` (a pruned one) in place of the loaded one where the route has it."""

    def write_reference(self, prepared: Prepared, path: Path, metadata: dict[str, str], say: Progress) -> Path:
        """The unpruned model as F16."""

    def calibration_model(self, prepared: Prepared):
        """What calibration runs the unpruned model's layers on."""

    def float_model(self, run: Run, chosen: Chosen, float_gguf: Path) -> FloatModel:
        """Shape (prune, recover) → write float → calibrate, into `float_gguf`."""
