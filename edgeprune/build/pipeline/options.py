"""What an export is asked for and what it returns, and the names of the files it writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgeprune.build.planner import Plan
from edgeprune.build.resources import Resources
from edgeprune.device.profiles import Profile
from edgeprune.device.llamacpp.quantizer import QUANT_TYPES
from edgeprune.build.quantize import QuantizeResult
from edgeprune.device.validation.quality import DEFAULT_PRECISION
from edgeprune.device.validation.results import ValidationReport
from edgeprune.device.validation.report import format_summary

Progress = Callable[[str], None]
REFERENCE_NAME = "reference-F16.gguf"
CALIB_SEQUENCES = 64  # the importance matrix's calibration sequences of 256 tokens, in memory
# On the layer-streamed path (models this machine cannot hold), one count serves the pruning and the importance
# matrix, and every sequence costs seconds per layer: the 8B shape's `prune --ffn 0.2 --quant Q4_K_M` takes 66 s a
# layer at 8 sequences (47.6 min in all on 2 cores), and the forward passes and refit grow with the count (about
# 4.5 min a layer at 32 pruning and 64 importance sequences, over 2 hours). What fewer sequences cost, measured on
# SmolLM2-135M (prune_model, ffn 0.2, PPL odd reference topics / The Tempest, dense 13.38 / 37.65): 32 sequences
# 14.77 / 63.84 in 152 s, 16 15.00 / 64.76 in 74 s, 8 15.74 / 65.52 in 40 s; Gemma 3 270M (dense 13.00 / 42.55):
# 14.61 / 75.55 in 146 s, 14.75 / 74.97 in 76 s, 15.39 / 76.56 in 37 s. 8 keeps an 8B run under an hour here at
# +7% / +3% (SmolLM2) and +5% / +1% (Gemma) PPL against 32; --calib-sequences 32 buys that back.
STREAMED_CALIB_SEQUENCES = 8
REPORT_NAME = "report.json"
RECOVERY_DIR = ".edgeprune-recovery"  # the teacher's cached outputs and distillation checkpoints, kept until done


@dataclass
class ExportOptions:
    quant: str | None = None  # None: the planner's choice for the profile (F16 without a profile)
    calib: Path | None = None  # None: the built-in offline calibration text
    eval: Path | None = None  # None: the built-in offline evaluation text
    imatrix: bool = True
    calib_sequences: int | None = None  # None: CALIB_SEQUENCES in memory, STREAMED_CALIB_SEQUENCES layer-streamed
    calib_seq_len: int = 256
    eval_ctx: int = 512
    eval_chunks: int = 20  # the most chunks validation scores (exactly this many when eval_precision is None)
    eval_precision: float | None = DEFAULT_PRECISION  # validation stops once its standard errors are this precise
    threads: int | None = None
    allow_pickle: bool = False
    host_profile: Profile | None = None  # this machine's measured profile: predictions next to measurements
    on_device: bool = False  # validation runs on the target device itself: judge measured speed
    prune: object | None = None  # edgeprune.build.pruning.PruneOptions; None: the planner decides
    search: str = "estimated"  # "measured": build the planner's best few and keep the one llama.cpp scores best
    streaming: str = "auto"  # "on": read the model layer by layer (edgeprune.build.streaming); "off": all in RAM
    device: str | None = None  # torch device for calibration and recovery; None: a CUDA GPU if present, else CPU
    mix: bool = False  # mixed precision (edgeprune.build.mixed): the planner's mixed candidates, or a mix at --quant's size
    distill: object | None = None  # edgeprune.build.pruning.distill.DistillOptions: recover a pruned model by distillation
    recovery_text: Path | None = None  # None: texts.recovery_texts (Shakespeare but The Tempest, Python docs)


@dataclass
class ExportResult:
    gguf: Path
    reference_gguf: Path | None  # None without a profile: nothing to validate against
    report_path: Path
    report: ValidationReport | None
    quantization: QuantizeResult | None  # None for an F16 output
    plan: Plan | None
    seconds: dict[str, float] = field(default_factory=dict)
    bundle: Path | None = None  # the validation bundle for the device; None without a profile
    resources: Resources | None = None  # the path taken and its memory and disk estimates

    @property
    def summary(self) -> str:
        lines = [f"plan        {self.plan.chosen.candidate.label(self.plan.base)}"] if self.plan else []
        if self.report is not None:
            lines.append(format_summary(self.report))
        return "\n".join(lines)


def provenance(model_path: Path, profile: Profile | None) -> dict[str, str]:
    """The edgeprune.* metadata every GGUF of a run carries."""
    metadata = {"edgeprune.source": Path(model_path).name}
    if profile is not None:
        metadata["edgeprune.profile"] = profile.name
    return metadata


def output_stem(model_path: str | Path) -> str:
    """Name outputs after the input: SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct."""
    path = Path(model_path)
    stem = path.name if path.is_dir() else path.stem
    base, _, suffix = stem.rpartition(".")
    if base and suffix.upper() in QUANT_TYPES:
        stem = base
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in stem).strip("-.")
    return cleaned or "model"
