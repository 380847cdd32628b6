"""One target of a build into `<out>/<target>/`: built in place of the earlier output, which is put back if the
build fails; its build.json, the cache entry, written last."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from edgeprune.build.builds.buildfile import Target
from edgeprune.build.builds.buildkey import BUILD_RECORD
from edgeprune.build.builds.outcome import TargetOutcome
from edgeprune.core.atomic import write_text_atomic
from edgeprune.core.errors import EdgepruneError
from edgeprune.device.bundle import sha256_of

PARTIAL = ".partial-"
Progress = Callable[[str], None]


def build_target(prepared, target: Target, profile_and_text, out: Path, key: str, topk: Path, scores,
                 found_versions: dict, say: Progress, made_of: dict) -> TargetOutcome:
    """One target into a hidden directory, renamed into place when complete; a failure is the target's alone.
    `made_of` (the key's inputs and the code files' hashes) goes into build.json, for the next build to say what
    changed."""
    from edgeprune.build.handoff import write_handoff
    from edgeprune.build.pipeline.output import build_output

    profile, profile_text = profile_and_text
    directory = out / target.name
    previous = out / f"{PARTIAL}old-{target.name}-{os.getpid()}"
    if directory.exists():  # kept until this build succeeds: a failure puts it back
        directory.rename(previous)
    directory.mkdir()
    try:
        profile_path = directory / profile.path.name
        profile_path.write_text(profile_text, encoding="utf-8")
        profile = dataclasses.replace(profile, path=profile_path)
        mine = dataclasses.replace(prepared, timings=dict(prepared.timings),
                                   options=dataclasses.replace(prepared.options, mix=target.mix))
        result = build_output(mine, profile, directory, say, [], reference_topk=topk, scores=scores)
        entry = _entry(prepared, target, profile, result, found_versions)
        settings = write_handoff(directory, target.name, entry, profile, prepared.loaded.vocab.chat_template,
                                 bool(prepared.base_shape.sliding_window))
        entry["artifacts"] = [{"path": str(f.relative_to(directory)), "bytes": f.stat().st_size,
                               "sha256": sha256_of(f)} for f in sorted(directory.rglob("*")) if f.is_file()]
        serve = settings.llama_cpp_python_server()
        # written last: a target directory without it is a build that did not finish
        write_text_atomic(directory / BUILD_RECORD, json.dumps({"key": key, **made_of, "entry": entry, "serve": serve},
                                                               indent=2))
        shutil.rmtree(previous, ignore_errors=True)
        return TargetOutcome(target.name, directory, "built", entry, serve=serve)
    except BaseException as exc:
        shutil.rmtree(directory, ignore_errors=True)
        if previous.exists():
            previous.rename(directory)
        if isinstance(exc, EdgepruneError):
            return TargetOutcome(target.name, directory, "failed", error=str(exc))
        raise


def _entry(prepared, target: Target, profile, result, found_versions: dict) -> dict:
    """The target's manifest entry: what it was built from and as, and its verdict."""
    report = result.report
    return {
        "target": target.name, "model": str(prepared.model_path), "profile": profile.name,
        "overrides": {k: v for k, v in dataclasses.asdict(target).items()
                      if k not in ("name", "profile") and v not in (None, False)},
        "gguf": result.gguf.name, "quant": result.gguf.stem.removesuffix("-mixed").rsplit("-", 1)[-1],
        "plan": result.plan.chosen.candidate.label(prepared.base_shape) if result.plan else None,
        "passed": report.passed if report else None, "seconds": result.seconds, "versions": found_versions,
    }
