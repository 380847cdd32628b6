"""The child process every llama.cpp measurement runs in.

A native crash (llama.cpp #20824 segfaults on Intel AMX CPUs) becomes a one-line error instead of killing the
caller, and the child's peak RSS is the model's own. The parent writes a task file and names the function that
runs it; the child runs it, reports progress on stderr and writes its result next to the task file.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Callable

from edgeprune.core.errors import EdgepruneError
from edgeprune.device.llamacpp.runtime import AMX_FIX

PROGRESS_MARK = "@edgeprune-progress "


def print_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --- the parent side ---------------------------------------------------------------------------------------


def run_child(function: Callable[[dict], dict], task: dict, doing: str, progress: Callable[[str], None]) -> dict:
    """Run `function(task)` in a fresh interpreter, relaying its progress lines and turning deaths into errors.
    `function` must be a module-level function: the child imports it by name."""
    package_root = str(Path(__file__).resolve().parents[3])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    entry = f"{function.__module__}:{function.__qualname__}"
    with tempfile.TemporaryDirectory(prefix="edgeprune-validate-") as tmp:
        task_path = Path(tmp) / "task.json"
        task_path.write_text(json.dumps(task), encoding="utf-8")
        code = "import sys; from edgeprune.device.llamacpp.child import child_main; child_main(sys.argv[1], sys.argv[2])"
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(task_path), entry], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, errors="replace", env=env,
        )
        other_lines: deque[str] = deque(maxlen=20)
        try:
            for line in proc.stderr:
                if line.startswith(PROGRESS_MARK):
                    progress(line[len(PROGRESS_MARK):].rstrip("\n"))
                elif line.strip():
                    other_lines.append(line.strip())
            returncode = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        result_path = task_path.with_name("result.json")
        if returncode < 0:
            raise _death_error(-returncode, doing, other_lines)
        if returncode != 0 or not result_path.is_file():
            last = other_lines[-1] if other_lines else f"exit status {returncode}"
            raise EdgepruneError(f"llama.cpp failed while {doing}: {last}")
        result = json.loads(result_path.read_text(encoding="utf-8"))
    if "error" in result:
        raise EdgepruneError(result["error"])
    return result


def _death_error(signum: int, doing: str, other_lines: deque[str]) -> EdgepruneError:
    """One line for a child killed by a signal: the known AMX crash gets its fix, OOM kills get theirs."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    if signum in (signal.SIGSEGV, signal.SIGILL):
        return EdgepruneError(
            f"llama.cpp crashed ({name}) while {doing}: native builds of llama-cpp-python crash on quantized models "
            f"on Intel AMX CPUs (llama.cpp #20824); rebuild it portably: {AMX_FIX}"
        )
    if signum == signal.SIGKILL:
        return EdgepruneError(f"llama.cpp was killed (SIGKILL) while {doing}, most likely out of memory: "
                              "free memory, or lower n_ctx or the profile's context_length")
    detail = f": {other_lines[-1]}" if other_lines else ""
    return EdgepruneError(f"llama.cpp died ({name}) while {doing}{detail}")


# --- the child side: runs in the measuring process ---------------------------------------------------------


def child_main(task_path: str, entry: str) -> None:
    """Entry point of the measuring process: run one task (`entry` names its function, module:name) and write
    its result next to the task file."""
    task_file = Path(task_path)
    task = json.loads(task_file.read_text(encoding="utf-8"))
    module, name = entry.split(":")
    try:
        result = getattr(importlib.import_module(module), name)(task)
    except EdgepruneError as exc:
        result = {"error": str(exc)}
    task_file.with_name("result.json").write_text(json.dumps(result), encoding="utf-8")


def report(line: str) -> None:
    """A progress line from the child, which the parent relays."""
    print(PROGRESS_MARK + line, file=sys.stderr, flush=True)
