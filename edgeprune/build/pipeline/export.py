"""`export_model`: the whole pipeline for one model and one profile, as `edgeprune export` runs it."""

from __future__ import annotations

import shutil
from pathlib import Path

from edgeprune.build.pipeline.checks import check_export_inputs
from edgeprune.build.pipeline.options import REFERENCE_NAME, ExportOptions, ExportResult, Progress, provenance
from edgeprune.build.pipeline.output import build_output
from edgeprune.build.pipeline.prepared import prepare
from edgeprune.build.resources import Resources
from edgeprune.core.texts import Text
from edgeprune.device.profiles import Profile


def export_model(model_path: str | Path, profile: Profile | None, out_dir: str | Path,
                 options: ExportOptions | None = None, progress: Progress | None = None) -> ExportResult:
    """Run the whole pipeline. With a profile and no explicit pruning, the planner chooses quant and pruning
    (an explicit --quant narrows its search); without a profile, nothing is planned or validated."""
    options = options or ExportOptions()
    say = progress or (lambda _msg: None)
    out_dir = Path(out_dir)
    calib, evaluation, resources = check_export_inputs(model_path, profile, out_dir, options)
    say(resources.describe())
    written: list[Path] = []
    try:
        return _export(model_path, profile, out_dir, options, say, calib, evaluation, resources, written)
    except BaseException:
        for path in written:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise


def _export(model_path, profile: Profile | None, out_dir: Path, options: ExportOptions, say: Progress, calib: Text,
            evaluation: Text | None, resources: Resources, written: list[Path]) -> ExportResult:
    """export_model's stages; every file it creates is appended to `written` first, for the caller's cleanup
    (files an earlier run left under the same names are not this run's to remove)."""
    prepared = prepare(model_path, options, calib, evaluation, resources, say)
    if profile is not None:
        if not (out_dir / REFERENCE_NAME).exists():
            written.append(out_dir / REFERENCE_NAME)
        prepared.write_reference(out_dir / REFERENCE_NAME, provenance(prepared.model_path, profile), say)
    return build_output(prepared, profile, out_dir, say, written)
