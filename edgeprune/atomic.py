"""Write outputs under a temporary name and rename them into place only when complete.

A user who interrupts an export, or whose disk fills, must never find a half-written GGUF under the
final name. Every output goes through `atomic_output`; `install_signal_handlers` turns SIGTERM into the
same clean unwinding that Ctrl-C (SIGINT) already gets.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from pathlib import Path
from typing import Iterator

from .errors import EdgepruneError

PARTIAL_MARK = ".partial-"


def partial_path(final: Path) -> Path:
    """The temporary name used while `final` is being written: hidden, in the same directory, so rename is atomic."""
    return final.with_name(f".{final.name}{PARTIAL_MARK}{os.getpid()}")


@contextlib.contextmanager
def atomic_output(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success rename it to `final`, on any failure delete it."""
    final = Path(final)
    ensure_writable_dir(final.parent)
    tmp = partial_path(final)
    try:
        yield tmp
        if not tmp.exists():
            raise EdgepruneError(f"internal error: nothing was written for {final}")
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise EdgepruneError(f"disk full while writing {final}: free some space and run again") from exc
        raise EdgepruneError(f"could not write {final}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(final: str | Path, text: str) -> None:
    with atomic_output(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def ensure_writable_dir(directory: Path) -> None:
    """Create `directory` if needed, and fail with one clear line when it cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgepruneError(f"cannot create output directory {directory}: {exc.strerror}") from exc
    if not os.access(directory, os.W_OK | os.X_OK):
        raise EdgepruneError(f"output directory {directory} is not writable: choose another --out or fix its permissions")


class Terminated(KeyboardInterrupt):
    """Raised on SIGTERM so that it unwinds exactly like Ctrl-C, through every cleanup."""


def install_signal_handlers() -> None:
    def on_term(signum, frame):  # noqa: ARG001 - signal handler signature
        raise Terminated(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
