"""What every suite shares: its result, Markdown tables, the machine note and the atomic JSON + Markdown output.

Speeds and timings mean little without the machine and its load, so every output carries them; the files
are written atomically so that an interrupted run never leaves a half table behind a finished one.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from edgeprune.core.atomic import write_text_atomic

VERSIONED = ("torch", "transformers", "llama-cpp-python", "gguf")


@dataclass
class SuiteResult:
    """What a suite measured (`data`, JSON-ready), how (`method`), and its Markdown sections in order."""

    title: str
    method: str
    data: dict
    sections: list[str] = field(default_factory=list)


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; cells are printed as given, so suites choose their own precision."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def relative(before: float, after: float) -> str:
    """`after` against `before` as a signed difference and percentage, e.g. "-0.412 (-2.1%)"."""
    return f"{after - before:+.4g} ({100 * (after - before) / before:+.1f}%)"


def machine() -> dict:
    """The machine and software the numbers were measured on; the load average shows how shared it was."""
    versions = {}
    for package in VERSIONED:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "versions": versions,
    }


def write_suite(out_dir: Path, name: str, result: SuiteResult, started: float, host: dict) -> list[Path]:
    """Write <out_dir>/<name>.json and .md; `host` is `machine()` taken when the suite started."""
    date = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started))
    seconds = round(time.time() - started, 1)
    document = {"suite": name, "title": result.title, "date": date, "seconds": seconds, "machine": host,
                "method": result.method, **result.data}
    software = ", ".join(f"{k} {v}" for k, v in host["versions"].items() if v)
    note = (
        f"## Method\n\n{result.method}\n\n"
        f"Run on {date}, {seconds:.0f} s in all, on {host['platform']} ({host['machine']}, "
        f"os.cpu_count() = {host['cpu_count']}, load average {' / '.join(map(str, host['load_average']))} at "
        f"the start), Python {host['python']}, {software}. Speeds are this machine's, not a device's."
    )
    markdown = "\n\n".join([f"# {result.title}", *result.sections, note]) + "\n"
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md"]
    write_text_atomic(paths[0], json.dumps(document, indent=2) + "\n")
    write_text_atomic(paths[1], markdown)
    return paths
