"""A target's cache key: the versions and content hashes of everything its output depends on, and, when the key
of an earlier build differs, the inputs that changed (told on the target's "rebuilding: ..." line)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from edgeprune.build.builds.outcome import TargetOutcome
from edgeprune.core.atomic import write_text_atomic
from edgeprune.device.bundle import sha256_of

BUILD_RECORD = "build.json"  # a target's cache entry: its key, the inputs behind it and what it wrote
# what planner.load_quality_table reads (a model's own quality table only where one was measured)
TABLES = ("quality_table.toml", "quality_table_gemma3.toml", "mixed_table.toml", "recovery_table.toml")
_BUILD_DIR = Path(__file__).resolve().parents[1]  # edgeprune/build, where the tables are
_ROOT = Path(__file__).resolve().parents[3]  # the repository: code files are named relative to it


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


class FileHashes:
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


def model_files(model: Path) -> list[Path]:
    if model.is_file():
        return [model]
    return sorted(f for f in model.iterdir() if f.is_file() and not f.name.startswith("."))


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def text_digest(*texts) -> str:
    return digest([text.content for text in texts])


def table_hashes() -> dict[str, str]:
    """sha256 of the planner's measured tables, by name."""
    return {name: sha256_of(_BUILD_DIR / name) for name in TABLES if (_BUILD_DIR / name).is_file()}


def code_file_hashes() -> dict[str, str]:
    """sha256 of each file `code_digest()` covers, by its path: recorded in build.json so that a rebuild for
    changed code names the files that changed."""
    from edgeprune.core.codedigest import code_files

    return {f.relative_to(_ROOT).as_posix(): sha256_of(f) for f in code_files()}


_INPUT_NAMES = {"model": "model file {}", "calibration": "calibration text", "evaluation": "evaluation text",
                "eval_ctx": "[evaluation] context", "eval_chunks": "[evaluation] chunks",
                "eval_precision": "[evaluation] precision", "versions": "{} version",
                "code": "edgeprune's code", "tables": "{}", "profile_file": "profile file {}",
                "profile": "profile with the target's overrides", "mix": "mix", "recovery": "recovery text"}


def changed_inputs(old: dict, new: dict, old_files: dict, new_files: dict) -> list[str]:
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


def cached(directory: Path, key: str, inputs: dict, code_files: dict) -> tuple[TargetOutcome | None, str]:
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
        changed = changed_inputs(record["inputs"], inputs, record.get("code_files", {}), code_files)
        return None, f"rebuilding: {', '.join(changed) or 'its inputs'} changed"
    for artifact in entry.get("artifacts", []):
        file = directory / artifact["path"]
        if not file.is_file() or file.stat().st_size != artifact["bytes"]:
            return None, f"rebuilding: {artifact['path']} is missing or not as built"
    return TargetOutcome(directory.name, directory, "cached", entry, serve=record.get("serve")), "up to date"
