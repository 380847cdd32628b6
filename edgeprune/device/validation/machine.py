"""The machine that measured: its record in the report, and the measuring process's own peak memory."""

from __future__ import annotations

import os
import sys


def machine_record(threads: int, llama_cpp: dict) -> dict:
    """What the numbers were measured on: CPU, cores, RAM, OS, the llama.cpp build and its system info, threads."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.lower().startswith(("model name", "hardware"))]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = None
    return {"hostname": platform.node(), "cpu": cpu, "machine": platform.machine(), "cores": os.cpu_count(),
            "ram_bytes": ram, "os": platform.platform(), "python": platform.python_version(),
            "llama_cpp_python": llama_cpp["version"], "llama_cpp_system_info": llama_cpp["system_info"],
            "threads": threads}


def peak_rss_bytes() -> int:
    """This process's own peak RSS. On Linux ru_maxrss survives exec and so carries the parent's peak from
    before the fork; VmHWM belongs to the current image alone, so it is read first."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB
