"""Benchmark suites that measure edgeprune against transformers and llama.cpp on the real SmolLM2-135M.

Suites are looked up by name and imported only when run, so a quick suite never pays for a slow one's
imports. A suite is a module with `run(progress) -> SuiteResult` (see `tables`); adding one is one line here.
"""

from __future__ import annotations

import importlib
from typing import Callable

from edgeprune.build.bench.tables import SuiteResult

SUITES: dict[str, str] = {
    "conversion": "edgeprune.build.bench.conversion",
    "quantization": "edgeprune.build.bench.quantization",
    "prediction": "edgeprune.build.bench.prediction",
    "budgets": "edgeprune.build.bench.budgets",
    "quality": "edgeprune.build.bench.quality",
    "quality-gemma3": "edgeprune.build.bench.quality:run_gemma3",
    "memory": "edgeprune.build.bench.memory",
    "topk": "edgeprune.build.bench.topk",
    "scale": "edgeprune.build.bench.scale",
    "build": "edgeprune.build.bench.builds",
    "export": "edgeprune.build.bench.builds:run_export",
    "mixed": "edgeprune.build.bench.mixed",
    "recovery": "edgeprune.build.bench.recovery",
}
# Suites that rerun part of another, for when that part alone is wanted: all suites leave them out.
PART_OF = {"export": "build"}


def suite_runner(name: str) -> Callable[[Callable[[str], None]], SuiteResult]:
    """The `run` function of the suite called `name` (or the function its entry names after a colon)."""
    module, _, function = SUITES[name].partition(":")
    return getattr(importlib.import_module(module), function or "run")


__all__ = ["SUITES", "SuiteResult", "suite_runner"]
