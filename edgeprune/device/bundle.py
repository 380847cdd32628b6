"""The validation bundle: what a device needs to validate a GGUF against its profile, and nothing more.

An export writes it beside the GGUF as `bundle/`: the GGUF itself (`model.gguf`, a hard link where the file
system allows), the evaluation chunks with the reference's top-k log-probs (`reference-topk.npz`, see
edgeprune.device.bundle_logits), the profile (`profile.toml`), what the host predicted and measured (`expected.json`),
and `manifest.json` with the sha256 and size of every other file. On the device, `edgeprune validate bundle/`
needs neither the reference GGUF nor torch: llama-cpp-python, numpy and the standard library.

Like every output, a bundle appears whole or not at all: it is built in a hidden directory and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeprune.core.atomic import PARTIAL_MARK
from edgeprune.core.errors import EdgepruneError

SCHEMA = 1
BUNDLE_NAME = "bundle"
MANIFEST = "manifest.json"
MODEL = "model.gguf"
REFERENCE = "reference-topk.npz"
PROFILE = "profile.toml"
EXPECTED = "expected.json"
HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class Bundle:
    directory: Path
    manifest: dict
    expected: dict  # eval settings, the device prediction and the host's validation report

    @property
    def model(self) -> Path:
        return self.directory / MODEL

    @property
    def reference(self) -> Path:
        return self.directory / REFERENCE

    @property
    def profile(self) -> Path:
        return self.directory / PROFILE


def is_bundle(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def start_bundle(out_dir: Path) -> Path:
    """An empty hidden directory to build the bundle in; `finish_bundle` renames it into place."""
    partial = out_dir / f".{BUNDLE_NAME}{PARTIAL_MARK}{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def finish_bundle(partial: Path, gguf: Path, profile_path: Path, expected: dict) -> Bundle:
    """Add the GGUF, the profile, `expected` and the manifest to `partial` (which already holds the reference
    top-k file), then replace `<out>/bundle` with it."""
    if not (partial / REFERENCE).is_file():
        raise EdgepruneError(f"internal error: the bundle in {partial} has no {REFERENCE}")
    try:
        os.link(gguf, partial / MODEL)
    except OSError:  # another file system, or links not allowed: a copy
        shutil.copyfile(gguf, partial / MODEL)
    shutil.copyfile(profile_path, partial / PROFILE)
    (partial / EXPECTED).write_text(json.dumps(expected, indent=2) + "\n", encoding="utf-8")
    files = {p.name: {"sha256": sha256_of(p), "bytes": p.stat().st_size} for p in sorted(partial.iterdir())}
    manifest = {"schema": SCHEMA, "model": MODEL, "files": files}
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    final = partial.parent / BUNDLE_NAME
    old = partial.parent / f".{BUNDLE_NAME}.old{PARTIAL_MARK}{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old, ignore_errors=True)
    return Bundle(final, manifest, expected)


def open_bundle(directory: str | Path, progress: Callable[[str], None] = lambda _line: None) -> Bundle:
    """Read a bundle and check every file against the manifest: a file damaged or cut short in the copy to the
    device must fail here, in one line, not as a wrong verdict."""
    directory = Path(directory)
    manifest = _read_json(directory / MANIFEST)
    if manifest.get("schema") != SCHEMA or not isinstance(manifest.get("files"), dict):
        raise EdgepruneError(f"{directory / MANIFEST} is not an edgeprune bundle manifest of schema {SCHEMA}: "
                             "export the bundle again with this edgeprune")
    for required in (MODEL, REFERENCE, PROFILE, EXPECTED):
        if required not in manifest["files"]:
            raise EdgepruneError(f"{directory / MANIFEST} lists no {required}: the bundle is incomplete")
    for name, entry in manifest["files"].items():
        path = directory / name
        progress(f"bundle: checking {name}")
        if not path.is_file():
            raise EdgepruneError(f"bundle file {path} is missing: copy the whole bundle directory again")
        if path.stat().st_size != entry["bytes"] or sha256_of(path) != entry["sha256"]:
            raise EdgepruneError(f"bundle file {path} differs from its manifest (damaged or cut short in the copy): "
                                 "copy the bundle again")
    return Bundle(directory, manifest, _read_json(directory / EXPECTED))


def chunks_to_score(directory: str | Path, requested: int | None,
                    progress: Callable[[str], None] = lambda _line: None) -> int | None:
    """--eval-chunks on a bundle: its reference-topk.npz fixes the chunks, so its first `requested` are scored, and
    more than it holds is refused. None (all of them) when none were requested."""
    if requested is None:
        return None
    from edgeprune.device.bundle_logits import load

    available, n_ctx = load(Path(directory) / REFERENCE)[1].shape
    if not 1 <= requested <= available:
        raise EdgepruneError(f"--eval-chunks {requested} on the bundle {directory}: its {REFERENCE} holds {available} "
                             f"chunks of {n_ctx} tokens, so give 1 to {available}")
    progress(f"scoring the first {requested} of the bundle's {available} chunks (--eval-chunks)")
    return requested


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise EdgepruneError(f"{path} is missing: give the bundle directory an export wrote") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgepruneError(f"{path} is not readable JSON ({exc}): copy the bundle again") from exc
    if not isinstance(data, dict):
        raise EdgepruneError(f"{path} is not a JSON object: copy the bundle again")
    return data
