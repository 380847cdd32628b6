"""The options of an export or a pruning run, from what the user asked for: the pruning (aligned to the quant
block), the recovery by distillation, and how the model is held (streaming, torch device, calibration size)."""

from __future__ import annotations

from pathlib import Path

from edgeprune.build.pipeline.options import ExportOptions
from edgeprune.core.errors import EdgepruneError


def prune_options(quant: str | None, heads: float | None, ffn: float | None, layers: int | None,
                  method: str | None, allocation: str | None):
    """PruneOptions from the flags, aligned to the quant block; None when no pruning flag was given."""
    if all(v is None for v in (heads, ffn, layers, method, allocation)):
        return None
    from edgeprune.build.planner import k_quant
    from edgeprune.build.pruning import PruneOptions

    options = PruneOptions(heads=heads or 0.0, ffn=ffn or 0.0, layers=layers or 0,
                           align=256 if quant and k_quant(quant.upper()) else 32)
    if method:
        options.method = method
    if allocation:
        options.allocation = allocation
    return options


def with_scale(options: ExportOptions, calib_sequences: int | None, streaming: str,
               device: str | None) -> ExportOptions:
    """Apply the scale flags to ExportOptions (and its PruneOptions)."""
    options.streaming, options.device = streaming, device
    if calib_sequences:
        options.calib_sequences = calib_sequences
        if options.prune is not None:
            options.prune.calib_sequences = calib_sequences
    return options


def with_recovery(options: ExportOptions, distill_steps: int, prune_steps: int | None,
                  recovery_text: Path | None, distill_rank: int = 0) -> ExportOptions:
    """Apply the recovery flags to ExportOptions (and its PruneOptions)."""
    from edgeprune.build.pruning.distill import LORA_LEARNING_RATE, DistillOptions

    if distill_steps < 0:
        raise EdgepruneError(f"--distill-steps must be 0 (off) or more, got {distill_steps}")
    if distill_rank < 0:
        raise EdgepruneError(f"--distill-rank must be 0 (train every weight) or more, got {distill_rank}")
    if distill_rank and not distill_steps:
        raise EdgepruneError("--distill-rank does nothing without --distill-steps: give both, or drop --distill-rank")
    if prune_steps is not None:
        if options.prune is None:
            raise EdgepruneError("--prune-steps needs pruning flags (--ffn, --heads or --layers) to split into steps")
        options.prune.steps = prune_steps
    low_rank = {"lora_rank": distill_rank, "learning_rate": LORA_LEARNING_RATE} if distill_rank else {}
    options.distill = DistillOptions(steps=distill_steps, **low_rank) if distill_steps else None
    options.recovery_text = recovery_text
    return options


def check_recovery_text(recovery_text: Path | None, distill_steps: int, prune, profile) -> None:
    """A recovery text without any recovery to use it (distillation steps, or the planner's recovery budget) is
    refused."""
    if recovery_text is not None and not (distill_steps or (prune is None and profile.budgets.recovery_minutes)):
        raise EdgepruneError("--recovery-text does nothing without --distill-steps or a recovery budget (the "
                             "profile's recovery_minutes or --recovery-minutes, with the planner choosing the "
                             "pruning): add one, or drop --recovery-text")
