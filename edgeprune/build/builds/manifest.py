"""What a build leaves next to its targets: manifest.json (every target's artifacts, plan and verdict, and the
versions) and the index page comparing the targets."""

from __future__ import annotations

import json
from pathlib import Path

from edgeprune.build.builds.buildfile import BuildFile
from edgeprune.build.builds.buildkey import BUILD_RECORD
from edgeprune.core.atomic import write_text_atomic

MANIFEST = "manifest.json"


def write_manifest(out: Path, build: BuildFile, found_versions: dict) -> Path:
    """Every target's artifacts (sha256, size), plan and verdict, built now or earlier, and the versions."""
    targets = {}
    for target in build.targets:
        try:
            targets[target.name] = json.loads((out / target.name / BUILD_RECORD).read_text())["entry"]
        except (OSError, json.JSONDecodeError, KeyError):
            continue
    path = out / MANIFEST
    write_text_atomic(path, json.dumps({"schema_version": 1, "build_file": str(build.path), "versions": found_versions,
                                        "targets": targets}, indent=2))
    return path


def write_index(out: Path, build: BuildFile) -> Path | None:
    """One page comparing every built target (P4's comparison page)."""
    from edgeprune.build import plots
    from edgeprune.device.reporting.compare import merge_reports
    from edgeprune.device.reporting.document import load_report

    documents = [load_report(out / t.name) for t in build.targets if (out / t.name / "report.json").is_file()]
    if not documents:
        return None
    merge_reports(documents, out / "index.html", out / "index.md", plots=plots)
    return out / "index.html"
