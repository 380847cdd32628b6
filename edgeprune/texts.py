"""Calibration and evaluation text: the user's files, or offline defaults that need no download.

The defaults come from Python's own language reference (`pydoc_data.topics`, about 460k characters on
every CPython install). Its topics are split in two disjoint halves by a fixed rule, so calibration
never sees the evaluation text (FLAP was criticised for calibrating and evaluating on the same corpus).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import EdgepruneError


@dataclass(frozen=True)
class Text:
    """A named body of text; `name` goes into reports and GGUF metadata so results can be traced."""

    name: str
    content: str


def _reference_topics(half: int) -> str:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    return "\n\n".join(topics[k] for i, k in enumerate(keys) if i % 2 == half)


def default_calibration_text() -> Text:
    return Text("python-reference (even topics)", _reference_topics(0))


def default_evaluation_text() -> Text:
    return Text("python-reference (odd topics)", _reference_topics(1))


def read_text_file(path: str | Path, purpose: str) -> Text:
    """Read a UTF-8 text file, with one-line errors for the usual mistakes."""
    path = Path(path)
    if not path.is_file():
        raise EdgepruneError(f"{purpose} text {path} does not exist: give a path to a UTF-8 text file")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EdgepruneError(
            f"{purpose} text {path} is not UTF-8 (byte {exc.start}): convert it, e.g. iconv -t UTF-8"
        ) from exc
    if not content.strip():
        raise EdgepruneError(f"{purpose} text {path} is empty: give a file with real text")
    return Text(path.name, content)


def calibration_text(path: str | Path | None) -> Text:
    return read_text_file(path, "calibration") if path else default_calibration_text()


def evaluation_text(path: str | Path | None) -> Text:
    return read_text_file(path, "evaluation") if path else default_evaluation_text()
