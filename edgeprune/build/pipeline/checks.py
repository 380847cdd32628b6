"""Everything an export can check before the model is loaded and before any file is written."""

from __future__ import annotations

from pathlib import Path

from edgeprune.build.calibration import check_calibration_length
from edgeprune.build.loading import layer_count
from edgeprune.build.pipeline.options import CALIB_SEQUENCES, STREAMED_CALIB_SEQUENCES, ExportOptions
from edgeprune.build.planner import check_search_options
from edgeprune.build.resources import Resources, plan_resources
from edgeprune.build.streaming import check_streamable, compute_device
from edgeprune.core.atomic import ensure_writable_dir
from edgeprune.core.errors import EdgepruneError
from edgeprune.core.texts import Text, calibration_text, check_evaluation_length, check_recovery_length, evaluation_text, \
    read_text_file
from edgeprune.device.profiles import Profile
from edgeprune.device.llamacpp.quantizer import check_quant_type
from edgeprune.device.validation.quality import check_evaluation_options


def check_export_inputs(model_path: str | Path, profile: Profile | None, out_dir: Path,
                        options: ExportOptions) -> tuple[Text, Text | None, Resources]:
    """Everything that can be checked without loading the model, in the order a user reads the flags: a bad flag
    costs seconds and writes nothing. Returns the calibration and evaluation texts, read and checked, and the
    path (in memory or layer-streamed) with its memory and disk estimates, refused if this machine lacks them."""
    if options.quant:
        check_quant_type(options.quant)
    check_search_options(options.search, options.mix, profile)
    if options.prune is not None:
        options.prune.validate(layer_count(model_path))
    if profile is not None:
        check_evaluation_options(options.eval_ctx, options.eval_chunks, options.eval_precision)
    calib = calibration_text(options.calib)
    check_calibration_length(len(calib.content.encode("utf-8")), options.calib_seq_len)
    evaluation = evaluation_text(options.eval) if profile is not None else None
    if evaluation is not None:  # no token covers less than a byte; the BOS is added
        check_evaluation_length(evaluation.name, len(evaluation.content.encode("utf-8")) + 1, options.eval_ctx,
                                options.eval_chunks, upper_bound=True)
    if options.recovery_text is not None:  # with the other texts, before the model is loaded
        from edgeprune.build.pruning.distill import DistillOptions

        check_recovery_length(read_text_file(options.recovery_text, "recovery"),
                              (options.distill or DistillOptions()).seq_len)
    ensure_writable_dir(out_dir)
    pruning = options.prune is not None or profile is not None
    resources = plan_resources(
        model_path, out_dir, options.streaming, pruning=pruning, reference=profile is not None,
        quantized=(options.quant or "F16") != "F16" or profile is not None,
        calibration_tokens=(options.calib_sequences or STREAMED_CALIB_SEQUENCES) * options.calib_seq_len)
    if options.calib_sequences is None:
        options.calib_sequences = STREAMED_CALIB_SEQUENCES if resources.streamed else CALIB_SEQUENCES
    compute_device(options.device)
    if resources.streamed:
        _check_streamed(options)
    if options.distill is not None:
        options.distill.validate()
    return calib, evaluation, resources


def _check_streamed(options: ExportOptions) -> None:
    """What the layer-streamed path cannot do, refused before anything is loaded."""
    if options.search == "measured":
        raise EdgepruneError("--search measured builds whole candidate models in memory, which the layer-streamed "
                             "path avoids: use --search estimated, or --streaming off if the model fits in RAM")
    if options.prune is not None:
        check_streamable(options.prune)
    if options.distill is not None:
        raise EdgepruneError("distillation trains the whole pruned model in memory, which the layer-streamed path "
                             "avoids: use --streaming off if the model fits in RAM, or drop --distill-steps")
