"""Write outputs under a temporary name and rename them into place only when complete.

A user who interrupts an export, or whose disk fills, must never find a half-written GGUF under the
final name. Every output goes through `atomic_output`; `install_signal_handlers` turns SIGTERM into the
same clean unwinding that Ctrl-C (SIGINT) gets.

A signal handler's exception can be lost: when the signal arrives while llama.cpp calls back into Python
through ctypes (its log callback runs during quantization), ctypes prints the exception and drops it, and
the export would carry on. So the handlers also record the signal, and `atomic_output` re-raises it before
it renames anything into place: an interrupted run never publishes a file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from pathlib import Path
from typing import Iterator

from edgeprune.core.errors import EdgepruneError

PARTIAL_MARK = ".partial-"
_HANDLED = (signal.SIGINT, signal.SIGTERM)
_received: int | None = None  # the signal the CLI got, set only once install_signal_handlers has run
# Write errors that mean "no room", with the advice that fits each.
_NO_ROOM = {
    errno.ENOSPC: "disk full while writing {final}: free some space and run again",
    errno.EDQUOT: "disk quota exceeded while writing {final}: free some space and run again",
    errno.EFBIG: ("file too large while writing {final}: the file system or the process's file-size limit "
                  "(ulimit -f) does not allow it; write to another --out or raise the limit"),
}


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
        raise_if_interrupted()
        if not tmp.exists():
            raise EdgepruneError(f"internal error: nothing was written for {final}")
        os.replace(tmp, final)
    except OSError as exc:
        error = write_error(exc, final, tmp)
        _discard(tmp)
        raise error from exc
    except BaseException:
        _discard(tmp)
        raise


def write_error(exc: OSError, final: str | Path, partial: Path | None = None) -> EdgepruneError:
    """One line for a failed write of `final`, saying when the cause is a full disk or a file-size limit."""
    code = exc.errno
    if code is None and partial is not None:
        code = _probe_errno(partial)  # numpy reports a short write ("4096 requested and 2560 written") without errno
    if code in _NO_ROOM:
        return EdgepruneError(_NO_ROOM[code].format(final=final))
    return EdgepruneError(f"could not write {final}: {exc.strerror or exc}")


def _probe_errno(path: Path) -> int | None:
    """Append one byte to the partial file: if the disk is full or the size limit reached, that fails with the errno."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except OSError:
        return None
    try:
        os.write(fd, b"\0")
    except OSError as exc:
        return exc.errno
    finally:
        os.close(fd)
    return None


def _discard(tmp: Path) -> None:
    """Delete a partial file with SIGINT/SIGTERM held back, so a second Ctrl-C cannot interrupt the cleanup."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        tmp.unlink(missing_ok=True)
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
    try:
        tmp.unlink(missing_ok=True)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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


def interruption(signum: int) -> KeyboardInterrupt:
    """The exception a received signal becomes (the writers here and distillation's checkpoints raise it)."""
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(f"terminated by signal {signum}")


def raise_if_interrupted() -> None:
    """Re-raise a signal whose exception a native callback swallowed; call it after long native calls."""
    if _received is not None:
        raise interruption(_received)


def install_signal_handlers() -> None:
    """For a process that ends on the first interrupt (the CLI): a recorded signal never goes stale there."""
    global _received
    _received = None

    def on_signal(signum, frame):  # noqa: ARG001 - signal handler signature
        global _received
        _received = signum
        raise interruption(signum)

    for signum in _HANDLED:
        signal.signal(signum, on_signal)
