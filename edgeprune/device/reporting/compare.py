"""Several runs on one page: one file on several devices, or several files on one device. A column per run,
quality against file size, the planners' frontiers (a curve per run) and each run's budget margins."""

from __future__ import annotations

from pathlib import Path

from edgeprune.core.errors import EdgepruneError
from edgeprune.device.reporting.document import FRONTIER, Plots, Run, Section, Table, margin, memory_short, verdict
from edgeprune.device.reporting.render import write_pages
from edgeprune.device.validation.results import MIB, ValidationReport


def merge_reports(documents: list[dict], out_html: Path, out_md: Path | None = None, *,
                  plots: Plots | None) -> list[Path]:
    """One comparison page of several runs (one file on several devices, several files on one device): a column
    per run, quality against file size, the frontiers, and each run's budget margins. Returns the paths written.
    `plots` draws the figures (edgeprune.build.plots); None leaves them out, and the page says so."""
    if not documents:
        raise EdgepruneError("no reports to merge: give one or more report.json files or export directories")
    runs = [Run.of(d) for d in documents]
    labels = run_labels(runs)
    sections = [Section("Runs", [_comparison_table(runs, labels)])]
    measured = [(label, run.validation) for label, run in zip(labels, runs) if run.validation]
    if measured:
        sections.append(Section("Quality against file size", [plots and plots.quality_plot(measured)]))
    planned = [(f"{label} ({run.plan['profile']})", run.plan) for label, run in zip(labels, runs) if run.plan]
    if planned:
        sections.append(Section(FRONTIER, [plots and plots.frontier_plot(planned)]))
    budgets = [(label, v) for label, v in measured if v.checks]
    if budgets:
        sections.append(Section("Budgets", [_merged_checks_table(budgets)] + [
            plots and plots.margin_plot(v.checks, f"margins-{i + 1}", f"Budget margins: {label}") for i, (label, v) in
            enumerate(budgets)]))
    return write_pages(f"edgeprune comparison of {len(runs)} runs", sections, Path(out_html),
                       Path(out_md) if out_md else None)


def run_labels(runs: list[Run]) -> list[str]:
    """Short names for the runs: what tells them apart (the file, the machine, or both), numbered if still equal."""
    files, machines = [r.file for r in runs], [r.machine for r in runs]
    if len(set(machines)) > 1 and len(set(files)) > 1:
        labels = [f"{f} on {m}" if m else f for f, m in zip(files, machines)]
    elif len(set(machines)) > 1:
        labels = [m or f for f, m in zip(files, machines)]
    else:
        labels = files
    if len(set(labels)) < len(labels):
        labels = [f"{i + 1}: {label}" for i, label in enumerate(labels)]
    return labels


def _comparison_table(runs: list[Run], labels: list[str]) -> Table:
    def row(name: str, cell) -> list[str]:
        return [name] + [cell(r.validation) if r.validation else "—" for r in runs]

    def kld(v: ValidationReport) -> str:
        return f"{v.divergence.kld_mean:.5f}" if v.divergence else "—"

    def top1(v: ValidationReport) -> str:
        return f"{100 * v.divergence.top1_agreement:.2f}%" if v.divergence else "—"

    return Table([""] + labels, [
        ["device"] + [r.machine or "not recorded" for r in runs],
        ["file"] + [r.file for r in runs],
        row("size", lambda v: f"{v.memory.file_bytes / MIB:.1f} MiB"),
        row("PPL", lambda v: f"{v.perplexity.ppl:.3f}"),
        row("KLD", kld),
        row("top-1", top1),
        row("decode", lambda v: f"{v.speed.decode_tps:.1f} tok/s"),
        row("prefill", lambda v: f"{v.speed.prefill_tps:.1f} tok/s"),
        row("TTFT", lambda v: f"{v.speed.ttft_s:.3f} s"),
        row("memory", memory_short),
        ["verdict"] + [verdict(r.validation) for r in runs],
    ])


def _merged_checks_table(budgets: list[tuple[str, ValidationReport]]) -> Table:
    names = list(dict.fromkeys(c.name for _, v in budgets for c in v.checks))

    def cell(v: ValidationReport, name: str) -> str:
        check = next((c for c in v.checks if c.name == name), None)
        if check is None:
            return "—"
        return (f"{'PASS' if check.passed else 'FAIL'} {check.measured:.3f} {check.unit} ({100 * margin(check):+.1f}%, "
                f"{check.basis})")

    return Table(["budget"] + [label for label, _ in budgets],
                 [[name] + [cell(v, name) for _, v in budgets] for name in names])
