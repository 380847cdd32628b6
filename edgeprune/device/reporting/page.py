"""One run's page: summary, device, budgets, predicted against measured, pruning, the planner's frontier and
tensor types; a part the report.json lacks is left out."""

from __future__ import annotations

import json
from pathlib import Path

from edgeprune.device.reporting.document import (FRONTIER, Plots, Run, Section, Table, basis, frontier_table,
                                                 limit_text, margin, verdict)
from edgeprune.device.reporting.render import write_pages
from edgeprune.device.validation.results import MIB, ValidationReport, with_stderr


def write_report_pages(document: dict, out_dir: Path, stem: str = "report", *, plots: Plots | None) -> list[Path]:
    """`<stem>.html`, `<stem>.md` and the Markdown's PNGs in `out_dir`, for one run. Returns the paths written.
    `plots` draws the figures (edgeprune.build.plots); None leaves them out, and the page says so."""
    run = Run.of(document)
    name = run.export.get("model") or run.file
    return write_pages(f"edgeprune report: {Path(str(name)).name}", _run_sections(run, plots),
                       Path(out_dir) / f"{stem}.html", Path(out_dir) / f"{stem}.md")


def _run_sections(run: Run, plots: Plots | None) -> list[Section]:
    """Summary, device, budgets, predictions and pruning; a part the document lacks is left out."""
    sections = [Section("Summary", [Table(["", "value"], _summary_rows(run))])]
    if run.device:
        sections.append(Section("Device", [Table(["", "value"], [[k, _device_value(k, v)]
                                                                   for k, v in run.device.items()])]))
    v = run.validation
    if v is not None and v.checks:
        sections.append(Section("Budgets", [_checks_table(v.checks), plots and plots.margin_plot(
            v.checks, "margins", "Budget margins")]))
    if v is not None and (v.predicted_device or v.predicted_host):
        sections.append(Section("Predicted and measured", [_prediction_table(v), plots and plots.prediction_plot(
            _prediction_pairs(v), _prediction_names(v))]))
    layers = (run.export.get("pruning") or {}).get("layers")
    if layers:
        sections.append(Section("Pruning", [plots and plots.layers_plot(layers)]))
    if run.plan is not None:
        sections.append(Section(FRONTIER, [frontier_table(run.plan), plots and plots.frontier_plot(
            [(run.plan["profile"], run.plan)])]))
    mixed = run.export.get("mixed")
    if mixed:
        sections.append(Section("Tensor types (mixed precision)", [
            Table(["tensor", "type"], [[name, type_name] for name, type_name in mixed["types"].items()])]))
    return sections


def _summary_rows(run: Run) -> list[list[str]]:
    v, e = run.validation, run.export
    rows = [[key, str(e[key])] for key in ("model", "profile", "quant") if e.get(key)]
    pruning = e.get("pruning")
    if pruning:
        rows.append(["pruning", f"{pruning['architecture']}, {pruning['removed_params'] / 1e6:.1f} M of "
                                f"{pruning['decoder_params_before'] / 1e6:.1f} M decoder parameters removed"])
    if e.get("mixed"):
        rows.append(["mixed precision", "bits per weight by sensitivity: " + ", ".join(e["mixed"]["bits_by_kind"])
                     + (f"; {e['mixed']['against_named']}" if e["mixed"].get("against_named") else "")])
    if v is None:
        return rows + [["validation", "none (exported without a profile)"]]
    ppl, speed, mem = v.perplexity, v.speed, v.memory
    rows += [
        ["GGUF", v.gguf],
        ["file size", f"{mem.file_bytes / MIB:.1f} MiB, {mem.n_params / 1e6:.1f} M parameters"],
        ["PPL", f"{with_stderr(ppl.ppl, ppl.ppl_stderr, 3)} ({v.eval_text}: {ppl.chunks_text()})"],
    ]
    if (d := v.divergence) is not None:
        rows += [["KLD", f"mean {with_stderr(d.kld_mean, d.kld_stderr, 5)}, p99 {d.kld_p99:.5f} "
                         f"(reference PPL {d.reference_ppl:.3f})"],
                 ["top-1", f"{100 * d.top1_agreement:.2f}% same as the reference"]]
    rows += [
        ["prefill", f"{speed.prefill_tps:.1f} tok/s (pp{speed.n_prompt}, {speed.threads} thread(s))"],
        ["decode", f"{speed.decode_tps:.1f} tok/s (tg{speed.n_gen}, {speed.threads} thread(s))"],
        ["TTFT", f"{speed.ttft_s:.3f} s for {speed.ttft_prompt_tokens} tokens"],
        ["memory", _memory_text(v)],
        ["peak RSS", f"{mem.peak_rss_bytes / MIB:.1f} MiB"],
        ["verdict", verdict(v)],
    ]
    return rows


def _memory_text(v: ValidationReport) -> str:
    """The total and its parts, each with its basis: measured by llama.cpp or computed."""
    mem = v.memory
    compute = (f"compute {mem.compute_buffer_bytes / MIB:.1f} MiB ({basis(v, 'compute_buffer')})"
               if mem.compute_buffer_bytes is not None else f"compute buffer {basis(v, 'compute_buffer')}")
    return (f"{mem.total_bytes / MIB:.1f} MiB = file + KV cache {mem.kv_cache_bytes / MIB:.1f} MiB "
            f"({basis(v, 'kv_cache')}, ctx {mem.context_length}, {mem.kv_cache_type}) + {compute}")


def _device_value(key: str, value) -> str:
    if key == "ram_bytes" and isinstance(value, (int, float)):
        return f"{value / 1024**3:.1f} GiB"
    return value if isinstance(value, str) else json.dumps(value)


def _checks_table(checks) -> Table:
    return Table(["budget", "limit", "measured", "margin", "basis", "result"], [
        [c.name, limit_text(c), f"{c.measured:.3f} {c.unit}", f"{100 * margin(c):+.1f}%", c.basis,
         "PASS" if c.passed else "FAIL"] for c in checks])


def _prediction_pairs(v: ValidationReport) -> list[tuple[str, float, list[float | None]]]:
    """(metric, measured, one prediction per model) for the metrics the cost model predicts."""
    predictions = [p for p in (v.predicted_device, v.predicted_host) if p is not None]
    return [
        ("decode tok/s", v.speed.decode_tps, [p.decode_tps for p in predictions]),
        ("prefill tok/s", v.speed.prefill_tps, [p.prefill_tps for p in predictions]),
        ("TTFT s", v.speed.ttft_s, [p.ttft_s for p in predictions]),
        ("memory MiB", v.memory.total_bytes / MIB, [p.memory_bytes / MIB for p in predictions]),
    ]


def _prediction_names(v: ValidationReport) -> list[str]:
    return ([f"predicted for {v.predicted_device.device} (target)"] if v.predicted_device else []) + \
           ([f"predicted for {v.predicted_host.device} (this machine)"] if v.predicted_host else [])


def _prediction_table(v: ValidationReport) -> Table:
    return Table(["metric", "measured"] + _prediction_names(v), [
        [metric, f"{measured:.3f}"] + [f"{p:.3f}" for p in predicted]
        for metric, measured, predicted in _prediction_pairs(v)])
