"""Every read of llama.cpp's log: its capture, and each parse, checked.

llama.cpp reports some things only in its log: the type its quantizer gives each tensor (dry run), K-quant
fallbacks, the buffers a context allocates, the reason a load or a quantization failed. The log is text
meant for people, and a llama-cpp-python release may reword it; so each parse here checks that it found
everything it must (every tensor of the file has a type; the KV buffers add up to the cache llama.cpp
says it made; every compute buffer) and otherwise fails in one line naming the llama-cpp-python version.
No parse falls back to a guess. Where a structured answer exists it is used instead or as the check: the
tensor list comes from the file (gguf-py's reader, or the layout a skeleton was written from), a real
quantization's fallbacks are checked against the types its file holds, the parameter count comes from the
model API. The dry run stays a log read: it writes no file, and a real quantization of SmolLM2's skeleton to
read the types from takes 2.4 s where the dry run takes 0.013 s (the planner prices hundreds of shapes).

No torch here: validation on a device reads the log too.
"""

from __future__ import annotations

import ctypes
import re
import threading
from dataclasses import dataclass

import gguf

from edgeprune.core.errors import EdgepruneError

MIB = 1024 * 1024
READ_VERSION = "0.3.36"  # the llama-cpp-python whose log lines the patterns below were written from
# "[  12/ 201] blk.0.attn_q.weight - [ 576,  576,  1,  1], type = f16, size = 0.633 MiB -> 0.178 MiB (q4_K)";
# a tensor kept as it is ends "size = 0.002 MiB". A fallback warning may stand between type and size.
_TENSOR_LINE = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[.*?\], type =\s*(\w+),.*?size =.*?MiB(?: \((\w+)\))?\s*$")
_FALLBACK = re.compile(r"warning: (\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\S+)\)"
                       r".*?falling back to\s+(\S+)")
_FALLBACK_COUNT = re.compile(r"WARNING: (\d+) of (\d+) tensor\(s\) required fallback quantization")
_KV_BUFFER = re.compile(r"KV buffer size =\s*([0-9.]+) MiB")
_KV_CACHE = re.compile(r"llama_kv_cache\w*: size =\s*([0-9.]+) MiB")
_COMPUTE_BUFFER = re.compile(r"compute buffer size =\s*([0-9.]+) MiB")


@dataclass
class Fallback:
    """A tensor whose row length is not a multiple of the target type's block, so llama.cpp used another type."""

    tensor: str
    row_length: int
    wanted: str
    used: str


class LlamaLog:
    """llama.cpp's log as its callback received it (pieces that join into lines)."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self._callback = None  # the ctypes callback must stay referenced for as long as llama.cpp may call it

    def mark(self) -> int:
        """A position in the log: `text(start, end)` is what llama.cpp logged between two marks."""
        return len(self.pieces)

    def text(self, start: int = 0, end: int | None = None) -> str:
        return "".join(self.pieces[start:end])

    def _install(self) -> None:
        import llama_cpp

        @llama_cpp.llama_log_callback
        def collect(level, text, user_data):  # noqa: ARG001 - ggml_log_callback signature
            try:
                self.pieces.append(text.decode("utf-8", "replace"))
            except BaseException:  # noqa: BLE001 - a signal landing here must not print a ctypes traceback;
                pass  # the handler has recorded it, and raise_if_interrupted re-raises it after the native call

        self._callback = collect
        llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))


# llama.cpp has one log callback per process: two threads capturing at once (`build --jobs 2` pricing two
# targets' plans) would each install theirs and one would read an empty log. Captures take turns.
_ONE_CAPTURE_AT_A_TIME = threading.RLock()


class captured:
    """`with captured() as log:` llama.cpp logs into `log` instead of printing; afterwards llama-cpp-python's
    own logger is back. Other threads' captures wait meanwhile."""

    def __enter__(self) -> LlamaLog:
        _ONE_CAPTURE_AT_A_TIME.acquire()
        self.log = LlamaLog()
        self.log._install()
        return self.log

    def __exit__(self, *exc) -> None:
        import llama_cpp
        from llama_cpp import _logger

        try:
            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        finally:
            _ONE_CAPTURE_AT_A_TIME.release()


_PROCESS_LOG: LlamaLog | None = None


def process_log() -> LlamaLog:
    """The log of this whole process, captured from the first call on (a measuring child process reads it)."""
    global _PROCESS_LOG
    if _PROCESS_LOG is None:
        _PROCESS_LOG = LlamaLog()
        _PROCESS_LOG._install()
    return _PROCESS_LOG


def llama_cpp_version() -> str:
    try:
        import llama_cpp
    except ImportError:
        return "(not installed)"
    return getattr(llama_cpp, "__version__", "(unknown version)")


def unreadable(what: str) -> EdgepruneError:
    """The one-line error for a log that lacks what edgeprune must read from it."""
    return EdgepruneError(f"llama.cpp's log under llama-cpp-python {llama_cpp_version()} {what}: edgeprune will not "
                          f"guess what it lacks (it reads the log as llama-cpp-python {READ_VERSION} writes it)")


def error_line(text: str) -> str | None:
    """The last line of the log that reports an error or a failure, for a one-line message."""
    lines = [line.strip() for line in text.splitlines() if "error" in line.lower() or "failed" in line.lower()]
    return lines[-1] if lines else None


def tensor_types(text: str, names: list[str], source: str) -> dict[str, str]:
    """The type (lower case, e.g. "q4_k") llama.cpp's quantizer gives each tensor, from its log of a run on the
    file `source` (a dry run logs the same lines). Each of `names`, the file's tensors, must have one."""
    found = {}
    for line in text.splitlines():
        if m := _TENSOR_LINE.search(line):
            found[m[1]] = (m[3] or m[2]).lower()
    missing = [name for name in names if name not in found]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise unreadable(f"gives no type for {len(missing)} of the {len(names)} tensors of {source} "
                         f"({shown})")
    for name in names:
        if found[name].upper() not in gguf.GGMLQuantizationType.__members__:
            raise unreadable(f"gives {name} of {source} the type {found[name]!r}, which gguf-py does not know")
    return {name: found[name] for name in names}


def fallbacks(text: str) -> list[Fallback]:
    """The tensors llama.cpp quantized to another type than the one asked for, from its warnings; as many as
    its closing count says (it logs the count only when there were some)."""
    found = [Fallback(m[1], int(m[2]), m[4].lower(), m[5].lower()) for m in _FALLBACK.finditer(text)]
    counts = [int(m[1]) for m in _FALLBACK_COUNT.finditer(text)]
    expected = counts[-1] if counts else 0
    if len(found) != expected:
        said = f"says {expected} tensors fell back to another type" if counts else "has no count of fallback tensors"
        raise unreadable(f"{said} but names {len(found)}")
    return found


def buffer_bytes(text: str) -> dict[str, int]:
    """The KV cache and compute buffers a context allocated, from its log (sizes in MiB with two decimals).
    The KV buffers must add up to the cache size llama.cpp reports, and at least one compute buffer be named."""
    kv = [float(m) for m in _KV_BUFFER.findall(text)]
    caches = [float(m) for m in _KV_CACHE.findall(text)]
    compute = [float(m) for m in _COMPUTE_BUFFER.findall(text)]
    if not kv or not caches:
        raise unreadable("names no KV cache buffer" if not kv else "does not say the KV cache's size")
    if abs(sum(kv) - sum(caches)) > 0.01 * (len(kv) + len(caches)):
        raise unreadable(f"names KV buffers of {sum(kv):.2f} MiB for a KV cache of {sum(caches):.2f} MiB")
    if not compute:
        raise unreadable("names no compute buffer")
    return {"kv_cache_bytes": round(sum(kv) * MIB), "compute_buffer_bytes": round(sum(compute) * MIB)}
