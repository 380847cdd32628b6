"""report.json read into the shape every page works from, the blocks a page is made of, and the wording the
single-run page and the comparison page share (verdicts, margins, memory bases)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from edgeprune.core.errors import EdgepruneError
from edgeprune.device.validation.budgets import AT_LEAST
from edgeprune.device.validation.results import MIB, ValidationReport

REPORT_JSON = "report.json"
FRONTIER = "Frontier (estimated by the planner)"  # the section of the planner's frontier, on both pages


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    name: str  # file name part: <stem>-<name>.png
    caption: str
    png: bytes


class Plots(Protocol):
    """What draws a page's figures: edgeprune.build.plots (matplotlib, which the device side never imports).
    Each returns None where it cannot draw."""

    def margin_plot(self, checks, name: str, title: str) -> Figure | None: ...

    def prediction_plot(self, pairs: list, predictions: list[str]) -> Figure | None: ...

    def layers_plot(self, layers: list[dict]) -> Figure | None: ...

    def quality_plot(self, measured: list) -> Figure | None: ...

    def frontier_plot(self, curves: list) -> Figure | None: ...


@dataclass
class Section:
    title: str
    blocks: list[Table | Figure | None] = field(default_factory=list)  # None: a plot not drawn (no matplotlib)


@dataclass
class Run:
    """One report.json, read: the validation typed, the optional parts (export, device) as they were written."""

    validation: ValidationReport | None
    export: dict
    device: dict

    @classmethod
    def of(cls, document: dict) -> Run:
        data = document.get("validation")
        validation = ValidationReport.from_dict(data) if data else None
        machine = validation.machine if validation is not None else None
        return cls(validation, document.get("export") or {}, document.get("device") or machine or {})

    @property
    def file(self) -> str:
        return Path(self.validation.gguf).name if self.validation else self.export.get("gguf", "?")

    @property
    def plan(self) -> dict | None:
        """The planner's plan, where it chose the output and recorded its frontier (older reports have none)."""
        plan = self.export.get("plan")
        return plan if plan and plan.get("frontier") else None

    @property
    def machine(self) -> str:
        """Where the numbers were measured, as the on-device run recorded it."""
        return str(self.device.get("hostname") or self.device.get("cpu") or "")


def load_report(path: str | Path) -> dict:
    """The document in `path` (report.json, or a directory holding one). A bare validation report
    (`edgeprune validate --json`) is wrapped as {"validation": ...} so every page reads one shape."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_JSON
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgepruneError(f"no report at {path}: give a report.json or the --out directory of an export") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgepruneError(f"cannot read report {path}: {exc}") from None
    if isinstance(document, dict) and "perplexity" in document:
        document = {"validation": document}
    if not isinstance(document, dict) or not ({"validation", "export"} & document.keys()):
        raise EdgepruneError(f"{path} is not an edgeprune report: it has neither 'validation' nor 'export'")
    try:
        Run.of(document)
    except (KeyError, TypeError, AttributeError) as exc:
        raise EdgepruneError(f"{path} is not an edgeprune report: its validation lacks or mistypes {exc}") from None
    return document


# --- the wording both pages use ----------------------------------------------------------------------------


def basis(v: ValidationReport, part: str) -> str:
    """'measured', 'computed' or 'unknown: ...': the memory report's basis for `part`, without its explanation."""
    return v.memory.basis.get(part, "basis not recorded").split(" (")[0]


def memory_short(v: ValidationReport) -> str:
    return (f"{v.memory.total_bytes / MIB:.1f} MiB (KV cache {basis(v, 'kv_cache')}, "
            f"compute {basis(v, 'compute_buffer')})")


def verdict(v: ValidationReport | None) -> str:
    if v is None or v.passed is None:
        return "no budgets"
    return "PASS" if v.passed else "FAIL"


def margin(check) -> float:
    """Headroom as a fraction of the limit: positive when the budget is met, whichever way the budget points."""
    ahead = check.measured - check.limit if check.name in AT_LEAST else check.limit - check.measured
    return ahead / check.limit


def frontier_table(plan: dict) -> Table:
    """The plan's frontier, a row per member: predictions, estimate, whether it meets the budgets, the chosen one."""
    def budgets(m: dict) -> str:
        return "PASS" if m["meets_budgets"] else "FAIL " + "; ".join(m["violations"])

    return Table(["candidate", "file", "memory", "decode", "TTFT", "est. PPL", "budgets", ""], [
        [m["label"], f"{m['file_mib']:.1f} MiB", f"{m['memory_mib']:.1f} MiB", f"{m['decode_tps']:.1f} tok/s",
         f"{m['ttft_s']:.2f} s", f"+{m['estimated_ppl_increase']:.1f}% ({m['estimate_basis']})", budgets(m),
         "chosen" if m["chosen"] else ""] for m in plan["frontier"]["members"]])


def limit_text(check) -> str:
    return f"{'≥' if check.name in AT_LEAST else '≤'} {check.limit:g} {check.unit}"
