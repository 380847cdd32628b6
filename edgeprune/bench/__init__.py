"""Benchmark suites that measure edgeprune against transformers and llama.cpp on the real SmolLM2-135M.

Suites are looked up by name and imported only when run, so a quick suite never pays for a slow one's
imports. A suite is a module with `run(progress) -> SuiteResult` (see `tables`); adding one is one line here.
"""

from __future__ import annotations

import importlib
from typing import Callable

from .tables import SuiteResult

SUITES: dict[str, str] = {
    "conversion": "edgeprune.bench.conversion",
    "quantization": "edgeprune.bench.quantization",
    "prediction": "edgeprune.bench.prediction",
    "budgets": "edgeprune.bench.budgets",
    "quality": "edgeprune.bench.quality",
    "memory": "edgeprune.bench.memory",
    "topk": "edgeprune.bench.topk",
    "scale": "edgeprune.bench.scale",
    "build": "edgeprune.bench.builds",
    "mixed": "edgeprune.bench.mixed",
    "recovery": "edgeprune.bench.recovery",
}


def suite_runner(name: str) -> Callable[[Callable[[str], None]], SuiteResult]:
    """The `run` function of the suite called `name`."""
    return importlib.import_module(SUITES[name]).run


__all__ = ["SUITES", "SuiteResult", "suite_runner"]
