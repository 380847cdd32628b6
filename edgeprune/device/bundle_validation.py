"""`edgeprune validate BUNDLE`: the bundle checked against its manifest, then its GGUF run as on the device,
against the bundle's profile (or another), with KL divergence from the reference's stored top-k log-probs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeprune.core.texts import Text
from edgeprune.device.bundle import Bundle, chunks_to_score, open_bundle
from edgeprune.device.profiles import Profile, load_profile
from edgeprune.device.validation.results import ValidationReport
from edgeprune.device.validation.entry import validate_gguf
from edgeprune.device.validation.report import write_report


@dataclass(frozen=True)
class BundleValidation:
    bundle: Bundle
    profile: Profile  # what the bundle was judged against
    report: ValidationReport


def validate_bundle(directory: Path, profile: str | Path | None = None, *, eval_chunks: int | None = None,
                    precision: float | None = None, threads: int | None = None, host_profile: str | Path | None = None,
                    progress: Callable[[str], None] = lambda _line: None) -> BundleValidation:
    """Validate the bundle in `directory` on this machine as the device, against `profile` (a name or path; None:
    the bundle's own), on all the bundle's chunks or its first `eval_chunks` (fewer once `precision` is reached);
    `host_profile` (a name or path) puts this machine's predictions beside the measurements."""
    chunks = chunks_to_score(directory, eval_chunks, progress)
    bundle = open_bundle(directory, progress)
    judged = load_profile(profile or str(bundle.profile))
    host = load_profile(host_profile) if host_profile else None
    report = validate_gguf(bundle.model, reference_topk=bundle.reference,
                           eval_text=Text(bundle.expected["eval_text"], ""), max_chunks=chunks, precision=precision,
                           threads=threads, profile=judged, host_profile=host, on_device=True, progress=progress)
    return BundleValidation(bundle, judged, report)


def write_bundle_report(result: BundleValidation, report_path: Path) -> dict:
    """The report of a bundle's validation as JSON at `report_path`, with what the bundle holds and the host's
    own validation beside it; returns the document."""
    expected = result.bundle.expected
    return write_report(report_path, result.report,
                        bundle={key: expected[key] for key in ("model", "quant", "profile")},
                        host_validation=expected["host_validation"])
