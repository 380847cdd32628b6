"""`run_build`: every target of a build file, those whose key is unchanged taken from the cache, the others built
from one prepared model in a thread pool; then the manifest and the index page."""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from edgeprune.build.builds.buildfile import DEFAULT_MODEL, BuildFile, Target
from edgeprune.build.builds.buildkey import FileHashes, cached, code_file_hashes, digest, model_files, table_hashes, \
    text_digest, versions
from edgeprune.build.builds.manifest import write_index, write_manifest
from edgeprune.build.builds.outcome import BuildResult, TargetOutcome
from edgeprune.build.builds.shared import SHARED, shared_reference, shared_topk
from edgeprune.build.builds.target import PARTIAL, build_target
from edgeprune.core.errors import EdgepruneError
from edgeprune.device.bundle import sha256_of

Progress = Callable[[str], None]


def run_build(build: BuildFile, *, only: tuple[str, ...] = (), jobs: int = 1, threads: int | None = None,
              progress: Progress | None = None) -> BuildResult:
    """Build every target (or `only` those), reusing what an earlier build left that nothing has changed."""
    from edgeprune.core.fetch import fetch_smollm2
    from edgeprune.core.texts import calibration_text, evaluation_text

    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    targets = _chosen_targets(build, only, jobs)
    out = build.out
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{PARTIAL}*"):  # the previous output of a target whose build was killed
        say(f"removing {stale.name}, left by an interrupted build")
        shutil.rmtree(stale, ignore_errors=True)
    model = fetch_smollm2() if build.model == DEFAULT_MODEL else Path(build.model)
    if not model.exists():
        raise EdgepruneError(f"{build.path}: model {model} does not exist: fix [model] path")
    calib, evaluation = calibration_text(build.calibration), evaluation_text(build.evaluation)
    profiles, profile_files = _profiles(targets, out)
    found_versions = versions()
    inputs, recorded = _key_inputs(build, model, calib, evaluation, targets, profiles, profile_files, found_versions,
                                   say)
    keys = {name: digest(value) for name, value in recorded.items()}
    code_files = code_file_hashes()
    outcomes, todo = {}, []
    for target in targets:
        outcome, why = cached(out / target.name, keys[target.name], recorded[target.name], code_files)
        if outcome is None:
            todo.append(target)
            say(f"{target.name}: {why}")
        else:
            outcomes[target.name] = outcome
            say(f"{target.name}: up to date ({outcome.entry['gguf']})")
    if todo:
        made_of = {name: {"inputs": recorded[name], "code_files": code_files} for name in recorded}
        outcomes.update(_build_todo(build, model, calib, evaluation, todo, profiles, keys, digest(inputs), made_of,
                                    found_versions, jobs, threads, say))
    ordered = [outcomes[t.name] for t in targets]
    manifest = write_manifest(out, build, found_versions)
    index = write_index(out, build)
    return BuildResult(ordered, manifest, index, time.perf_counter() - start)


def _chosen_targets(build: BuildFile, only: tuple[str, ...], jobs: int) -> list[Target]:
    """The targets to build: all, or `only` those named (each must be one of the file's)."""
    if jobs < 1:
        raise EdgepruneError(f"--jobs must be 1 or more, got {jobs}")
    unknown = sorted(set(only) - {t.name for t in build.targets})
    if unknown:
        raise EdgepruneError(f"no target {unknown[0]!r} in {build.path}: its targets are "
                             f"{', '.join(t.name for t in build.targets)}")
    return [t for t in build.targets if not only or t.name in only]


def _profiles(targets: list[Target], out: Path) -> tuple[dict, dict[str, Path]]:
    """Each target's effective profile (the shipped or given file with the target's overrides) and its text, and
    the file it came from."""
    from edgeprune.device.profiles import load_profile
    from edgeprune.device.profile_writing import with_overrides

    profiles, profile_files = {}, {}
    for target in targets:
        base = load_profile(target.profile)
        profile_files[target.name] = Path(base.path)
        deci = None if target.allocation is None else target.allocation == "adaptive"
        if deci and not base.runtime.allow_deci:
            raise EdgepruneError(f"target {target.name!r}: allocation \"adaptive\" writes a deci GGUF, which profile "
                                 f"{base.name} does not allow (runtime.allow_deci = false)")
        profiles[target.name] = with_overrides(base, out / target.name / f"{base.name}.toml",
                                               context_length=target.context_length, quant_types=target.quants,
                                               allow_deci=deci, recovery_minutes=target.recovery_minutes)
    return profiles, profile_files


def _key_inputs(build: BuildFile, model: Path, calib, evaluation, targets: list[Target], profiles: dict,
                profile_files: dict[str, Path], found_versions: dict, say: Progress) -> tuple[dict, dict[str, dict]]:
    """What the reference, its top-k file and the score cache depend on, and what each target's output depends on:
    those shared inputs, the tables its plan reads, its profile file and effective profile (the file with the
    target's overrides), and its own options."""
    from edgeprune.core.codedigest import code_digest
    from edgeprune.core.texts import read_text_file, recovery_texts

    hashes = FileHashes(build.out / ".input-hashes.json")
    say(f"hashing the inputs ({model.name})")
    inputs = {"model": {f.name: hashes.of(f) for f in model_files(model)}, "calibration": text_digest(calib),
              "evaluation": text_digest(evaluation), "eval_ctx": build.eval_ctx, "eval_chunks": build.eval_chunks,
              "eval_precision": build.eval_precision,
              "versions": found_versions, "code": code_digest()}
    tables = table_hashes()
    recovery = None
    if any(profile.budgets.recovery_minutes for profile, _ in profiles.values()):
        recovery = text_digest(*([read_text_file(build.recovery, "recovery")] if build.recovery
                                 else recovery_texts()))
    hashes.save()
    recorded = {}
    for target in targets:
        profile, text = profiles[target.name]
        source = profile_files[target.name]
        own = {"mix": True} if target.mix else {}
        if profile.budgets.recovery_minutes:
            own["recovery"] = recovery
        recorded[target.name] = {**inputs, "tables": tables, "profile_file": {source.name: sha256_of(source)},
                                 "profile": hashlib.sha256(text.encode()).hexdigest(), **own}
    return inputs, recorded


def _build_todo(build: BuildFile, model: Path, calib, evaluation, todo: list[Target], profiles: dict,
                keys: dict[str, str], shared_key: str, made_of: dict[str, dict], found_versions: dict, jobs: int,
                threads: int | None, say: Progress) -> dict[str, TargetOutcome]:
    """Prepare the model once, write the shared reference and its logits once, then build each target, `jobs` at a
    time."""
    from edgeprune.build.pipeline.checks import check_export_inputs
    from edgeprune.build.pipeline.options import ExportOptions, provenance
    from edgeprune.build.pipeline.prepared import prepare

    out = build.out
    options = ExportOptions(calib=build.calibration, eval=build.evaluation, eval_ctx=build.eval_ctx,
                            eval_chunks=build.eval_chunks, eval_precision=build.eval_precision, threads=threads,
                            recovery_text=build.recovery)
    _, _, resources = check_export_inputs(model, profiles[todo[0].name][0], out, options)
    say(resources.describe())
    prepared = prepare(model, options, calib, evaluation, resources, say)
    prepared.shared = True
    shared_dir = out / SHARED
    shared_dir.mkdir(exist_ok=True)
    prepared.teacher_dir = shared_dir / "teacher"
    reference = shared_reference(prepared, shared_dir, shared_key, provenance(model, None), say)
    topk, scores = shared_topk(reference, evaluation, build, shared_dir, threads, say)
    done, started = [], time.perf_counter()

    def one(index_target):
        i, target = index_target
        name = target.name

        def tell(message: str) -> None:
            say(f"[{name} {i + 1}/{len(todo)}] {message}")

        outcome = build_target(prepared, target, profiles[name], out, keys[name], topk, scores, found_versions,
                               tell, made_of[name])
        done.append(name)
        left = len(todo) - len(done)
        per_target = (time.perf_counter() - started) / len(done)
        say(f"{name}: {outcome.status}; {len(done)} of {len(todo)} targets done"
            + (f", about {per_target * left / jobs:.0f} s left" if left else ""))
        return outcome

    outcomes = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # one job: in this thread, where signals are handled
        for outcome in (pool.map if jobs > 1 else map)(one, enumerate(todo)):
            outcomes[outcome.name] = outcome
    return outcomes
