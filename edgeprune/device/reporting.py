"""Readable pages from report.json: one run as HTML and Markdown, or several runs side by side.

A page is built once as a list of sections (tables and figures) and then rendered twice, so the HTML and the
Markdown always say the same thing. The HTML is self-contained (CSS inline, plots as base64 PNG): it can be
mailed or archived as one file and opens offline. The Markdown links the same PNGs, written next to it as
`<stem>-<plot>.png`, because Markdown viewers (GitHub among them) do not show data-URI images.

matplotlib is imported inside the plotting functions only: the CLI and the pipeline import this module on
every run, and most runs never draw.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from edgeprune.core.atomic import atomic_output, write_text_atomic
from edgeprune.core.errors import EdgepruneError
from edgeprune.device.validation.budgets import AT_LEAST
from edgeprune.device.validation.results import MIB, ValidationReport

REPORT_JSON = "report.json"
PASS_COLOR = "#2ca02c"  # margin bars; the page's PASS/FAIL cells use other shades, so a screenshot tells them apart
FAIL_COLOR = "#d62728"
SERIES = ["C0", "C1", "C4", "C5", "C6", "C7", "C8", "C9"]  # matplotlib's cycle without C2/C3, the pass/fail colours
DPI = 100


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    name: str  # file name part: <stem>-<name>.png
    caption: str
    png: bytes


@dataclass
class Section:
    title: str
    blocks: list[Table | Figure] = field(default_factory=list)


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


def write_report_pages(document: dict, out_dir: Path, stem: str = "report") -> list[Path]:
    """`<stem>.html`, `<stem>.md` and the Markdown's PNGs in `out_dir`, for one run. Returns the paths written."""
    run = Run.of(document)
    name = run.export.get("model") or run.file
    return _write_pages(f"edgeprune report: {Path(str(name)).name}", _run_sections(run),
                        Path(out_dir) / f"{stem}.html", Path(out_dir) / f"{stem}.md")


def merge_reports(documents: list[dict], out_html: Path, out_md: Path | None = None) -> list[Path]:
    """One comparison page of several runs (one file on several devices, several files on one device): a column
    per run, quality against file size, and each run's budget margins. Returns the paths written."""
    if not documents:
        raise EdgepruneError("no reports to merge: give one or more report.json files or export directories")
    runs = [Run.of(d) for d in documents]
    labels = run_labels(runs)
    sections = [Section("Runs", [_comparison_table(runs, labels)])]
    measured = [(label, run.validation) for label, run in zip(labels, runs) if run.validation]
    if measured:
        sections.append(Section("Quality against file size", [_quality_plot(measured)]))
    budgets = [(label, v) for label, v in measured if v.checks]
    if budgets:
        sections.append(Section("Budgets", [_merged_checks_table(budgets)] + [
            _margin_plot(v.checks, f"margins-{i + 1}", f"Budget margins: {label}") for i, (label, v) in
            enumerate(budgets)]))
    return _write_pages(f"edgeprune comparison of {len(runs)} runs", sections, Path(out_html),
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


# --- the sections ------------------------------------------------------------------------------------------


def _run_sections(run: Run) -> list[Section]:
    """Summary, device, budgets, predictions and pruning; a part the document lacks is left out."""
    sections = [Section("Summary", [Table(["", "value"], _summary_rows(run))])]
    if run.device:
        sections.append(Section("Device", [Table(["", "value"], [[k, _device_value(k, v)]
                                                                   for k, v in run.device.items()])]))
    v = run.validation
    if v is not None and v.checks:
        sections.append(Section("Budgets", [_checks_table(v.checks), _margin_plot(v.checks, "margins",
                                                                                   "Budget margins")]))
    if v is not None and (v.predicted_device or v.predicted_host):
        sections.append(Section("Predicted and measured", [_prediction_table(v), _prediction_plot(v)]))
    layers = (run.export.get("pruning") or {}).get("layers")
    if layers:
        sections.append(Section("Pruning", [_layers_plot(layers)]))
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
        ["PPL", f"{ppl.ppl:.3f} ({v.eval_text}: {ppl.n_chunks} chunks of {ppl.n_ctx} tokens)"],
    ]
    if (d := v.divergence) is not None:
        rows += [["KLD", f"mean {d.kld_mean:.5f}, p99 {d.kld_p99:.5f} (reference PPL {d.reference_ppl:.3f})"],
                 ["top-1", f"{100 * d.top1_agreement:.2f}% same as the reference"]]
    rows += [
        ["prefill", f"{speed.prefill_tps:.1f} tok/s (pp{speed.n_prompt}, {speed.threads} thread(s))"],
        ["decode", f"{speed.decode_tps:.1f} tok/s (tg{speed.n_gen}, {speed.threads} thread(s))"],
        ["TTFT", f"{speed.ttft_s:.3f} s for {speed.ttft_prompt_tokens} tokens"],
        ["memory", _memory_text(v)],
        ["peak RSS", f"{mem.peak_rss_bytes / MIB:.1f} MiB"],
        ["verdict", _verdict(v)],
    ]
    return rows


def _basis(v: ValidationReport, part: str) -> str:
    """'measured', 'computed' or 'unknown: ...': the memory report's basis for `part`, without its explanation."""
    return v.memory.basis.get(part, "basis not recorded").split(" (")[0]


def _memory_text(v: ValidationReport) -> str:
    """The total and its parts, each with its basis: measured by llama.cpp or computed."""
    mem = v.memory
    compute = (f"compute {mem.compute_buffer_bytes / MIB:.1f} MiB ({_basis(v, 'compute_buffer')})"
               if mem.compute_buffer_bytes is not None else f"compute buffer {_basis(v, 'compute_buffer')}")
    return (f"{mem.total_bytes / MIB:.1f} MiB = file + KV cache {mem.kv_cache_bytes / MIB:.1f} MiB "
            f"({_basis(v, 'kv_cache')}, ctx {mem.context_length}, {mem.kv_cache_type}) + {compute}")


def _memory_short(v: ValidationReport) -> str:
    return (f"{v.memory.total_bytes / MIB:.1f} MiB (KV cache {_basis(v, 'kv_cache')}, "
            f"compute {_basis(v, 'compute_buffer')})")


def _verdict(v: ValidationReport | None) -> str:
    if v is None or v.passed is None:
        return "no budgets"
    return "PASS" if v.passed else "FAIL"


def _device_value(key: str, value) -> str:
    if key == "ram_bytes" and isinstance(value, (int, float)):
        return f"{value / 1024**3:.1f} GiB"
    return value if isinstance(value, str) else json.dumps(value)


def margin(check) -> float:
    """Headroom as a fraction of the limit: positive when the budget is met, whichever way the budget points."""
    ahead = check.measured - check.limit if check.name in AT_LEAST else check.limit - check.measured
    return ahead / check.limit


def _limit_text(check) -> str:
    return f"{'≥' if check.name in AT_LEAST else '≤'} {check.limit:g} {check.unit}"


def _checks_table(checks) -> Table:
    return Table(["budget", "limit", "measured", "margin", "basis", "result"], [
        [c.name, _limit_text(c), f"{c.measured:.3f} {c.unit}", f"{100 * margin(c):+.1f}%", c.basis,
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
        row("memory", _memory_short),
        ["verdict"] + [_verdict(r.validation) for r in runs],
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


# --- the plots ---------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, whatever backend the user configured
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def _margin_plot(checks, name: str, title: str) -> Figure:
    """A bar per budget: the margin in % of its limit, green when met, red when missed. Bars stop at ±100% so
    one huge miss does not flatten the others; the label carries the exact numbers."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(checks)))
    shown = [100 * max(-1.0, min(1.0, margin(c))) for c in checks]
    ax.barh(range(len(checks)), shown, color=[PASS_COLOR if c.passed else FAIL_COLOR for c in checks])
    ax.set_yticks(range(len(checks)), [c.name for c in checks])
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlim(-110, 110)
    ax.set_xlabel("margin (% of the limit; right of 0: budget met)")
    for i, c in enumerate(checks):
        ax.text(-105 if shown[i] > 0 else 5, i, f"{c.measured:.3g} {c.unit} {_limit_text(c)} ({100 * margin(c):+.0f}%)",
                va="center", fontsize=8)
    return Figure(name, title, _png(fig))


def _prediction_plot(v: ValidationReport) -> Figure:
    plt = _pyplot()
    pairs, names = _prediction_pairs(v), ["measured"] + _prediction_names(v)
    fig, axes = plt.subplots(1, len(pairs), figsize=(10, 3.2))
    for ax, (metric, measured, predicted) in zip(axes, pairs):
        ax.bar(range(len(names)), [measured] + predicted, color=SERIES[:len(names)])
        ax.set_xticks(range(len(names)), [""] * len(names))
        ax.set_title(metric, fontsize=10)
    fig.legend([plt.Rectangle((0, 0), 1, 1, color=c) for c in SERIES[:len(names)]], names,
               loc="lower center", ncol=len(names), fontsize=8, bbox_to_anchor=(0.5, -0.05))
    caption = ("Measured on the machine that ran the validation; a prediction for another device is the "
               "cost model's number for that device, not an estimate of this measurement")
    return Figure("predicted", caption, _png(fig))


def _layers_plot(layers: list[dict]) -> Figure:
    plt = _pyplot()
    index = range(len(layers))
    fig, (heads, ffn) = plt.subplots(2, 1, figsize=(8, 4.5), sharex=True)
    heads.bar(index, [layer["n_head"] for layer in layers], color=SERIES[0], label="query heads")
    heads.bar(index, [layer["n_head_kv"] for layer in layers], color=SERIES[1], width=0.4, label="KV heads")
    heads.set_ylabel("heads kept")
    heads.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ffn.bar(index, [layer["n_ff"] for layer in layers], color=SERIES[2])
    ffn.set_ylabel("FFN width kept")
    ffn.set_xlabel("layer")
    return Figure("layers", "Kept attention heads and FFN width per layer", _png(fig))


def _quality_plot(measured: list[tuple[str, ValidationReport]]) -> Figure:
    """PPL against file size, and KLD against file size where every run measured it: one labeled point per run."""
    plt = _pyplot()
    metrics = [("PPL", lambda v: v.perplexity.ppl)]
    if all(v.divergence for _, v in measured):
        metrics.append(("KLD (mean)", lambda v: v.divergence.kld_mean))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8), squeeze=False)
    for ax, (metric, value) in zip(axes[0], metrics):
        points: dict[tuple[float, float], list[str]] = {}  # one file on several devices: one point, all the names
        for label, v in measured:
            points.setdefault((v.memory.file_bytes / MIB, value(v)), []).append(label)
        for i, ((x, y), labels) in enumerate(points.items()):
            ax.scatter([x], [y], color=SERIES[i % len(SERIES)])
            ax.annotate("\n".join(labels), (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.margins(x=0.35, y=0.2)
        ax.set_xlabel("file size (MiB)")
        ax.set_ylabel(metric)
    return Figure("quality", "Quality against file size, one point per run", _png(fig))


# --- rendering ---------------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 1.5em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.pass { background: #e8f5e9; color: #1b5e20; font-weight: bold; }
td.fail { background: #ffebee; color: #b71c1c; font-weight: bold; }
img { max-width: 100%; display: block; }
figcaption { font-size: 0.9em; color: #555; margin-bottom: 1em; }
"""


def _write_pages(title: str, sections: list[Section], out_html: Path, out_md: Path | None) -> list[Path]:
    written = [out_html]
    write_text_atomic(out_html, _to_html(title, sections))
    if out_md is not None:
        for figure in _figures(sections):
            png = out_md.with_name(f"{out_md.stem}-{figure.name}.png")
            with atomic_output(png) as tmp:
                tmp.write_bytes(figure.png)
            written.append(png)
        write_text_atomic(out_md, _to_markdown(title, sections, out_md.stem))
        written.append(out_md)
    return written


def _figures(sections: list[Section]) -> list[Figure]:
    return [b for s in sections for b in s.blocks if isinstance(b, Figure)]


def _to_html(title: str, sections: list[Section]) -> str:
    def cell(tag: str, text: str) -> str:
        result = text.split(" ")[0]
        css = f' class="{result.lower()}"' if tag == "td" and result in ("PASS", "FAIL") else ""
        return f"<{tag}{css}>{html.escape(text)}</{tag}>"

    parts = [f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
             f"<style>{CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Table):
                parts.append("<table><tr>" + "".join(cell("th", h) for h in block.header) + "</tr>")
                parts += ["<tr>" + "".join(cell("td", c) for c in row) + "</tr>" for row in block.rows]
                parts.append("</table>")
            else:
                data = base64.b64encode(block.png).decode("ascii")
                parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(block.caption)}">'
                             f"<figcaption>{html.escape(block.caption)}</figcaption></figure>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _to_markdown(title: str, sections: list[Section], stem: str) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    parts = [f"# {title}"]
    for section in sections:
        parts.append(f"\n## {section.title}\n")
        for block in section.blocks:
            if isinstance(block, Table):
                parts += [line(block.header), line(["---"] * len(block.header))] + [line(r) for r in block.rows]
                parts.append("")
            else:
                parts.append(f"![{block.caption}]({stem}-{block.name}.png)\n\n*{block.caption}*\n")
    return "\n".join(parts) + "\n"
