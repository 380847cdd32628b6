"""The report pages' figures, as PNG bytes: what the device side's pages are given to draw with (`plots=`).

They live on the build side because the device side never imports matplotlib (pyproject.toml's contracts).
matplotlib is imported inside `_pyplot` only, and only if it is installed: the CLI and the pipeline import this
module on every run, most runs never draw, and a device install usually has no matplotlib. Without it every
plot function returns None, and the page is written with its tables and a note (render.PLOTS_NEED_MATPLOTLIB).
It imports neither torch nor transformers, so the CLI of a device install may use it.
"""

from __future__ import annotations

import io

from edgeprune.device.reporting.document import Figure, limit_text, margin
from edgeprune.device.validation.results import MIB, ValidationReport

PASS_COLOR = "#2ca02c"  # margin bars; the page's PASS/FAIL cells use other shades, so a screenshot tells them apart
FAIL_COLOR = "#d62728"
SERIES = ["C0", "C1", "C4", "C5", "C6", "C7", "C8", "C9"]  # matplotlib's cycle without C2/C3, the pass/fail colours
DPI = 100


def _pyplot():
    """pyplot on a files-only backend, or None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display, whatever backend the user configured
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _png(plt, fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def margin_plot(checks, name: str, title: str) -> Figure | None:
    """A bar per budget: the margin in % of its limit, green when met, red when missed. Bars stop at ±100% so
    one huge miss does not flatten the others; the label carries the exact numbers."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(checks)))
    shown = [100 * max(-1.0, min(1.0, margin(c))) for c in checks]
    ax.barh(range(len(checks)), shown, color=[PASS_COLOR if c.passed else FAIL_COLOR for c in checks])
    ax.set_yticks(range(len(checks)), [c.name for c in checks])
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlim(-110, 110)
    ax.set_xlabel("margin (% of the limit; right of 0: budget met)")
    for i, c in enumerate(checks):
        ax.text(-105 if shown[i] > 0 else 5, i, f"{c.measured:.3g} {c.unit} {limit_text(c)} ({100 * margin(c):+.0f}%)",
                va="center", fontsize=8)
    return Figure(name, title, _png(plt, fig))


def prediction_plot(pairs: list[tuple[str, float, list[float]]], predictions: list[str]) -> Figure | None:
    """One panel per metric: the measured value and each prediction (`pairs` and `predictions` from the page)."""
    plt = _pyplot()
    if plt is None:
        return None
    names = ["measured"] + predictions
    fig, axes = plt.subplots(1, len(pairs), figsize=(10, 3.2))
    for ax, (metric, measured, predicted) in zip(axes, pairs):
        ax.bar(range(len(names)), [measured] + predicted, color=SERIES[:len(names)])
        ax.set_xticks(range(len(names)), [""] * len(names))
        ax.set_title(metric, fontsize=10)
    fig.legend([plt.Rectangle((0, 0), 1, 1, color=c) for c in SERIES[:len(names)]], names,
               loc="lower center", ncol=len(names), fontsize=8, bbox_to_anchor=(0.5, -0.05))
    caption = ("Measured on the machine that ran the validation; a prediction for another device is the "
               "cost model's number for that device, not an estimate of this measurement")
    return Figure("predicted", caption, _png(plt, fig))


def layers_plot(layers: list[dict]) -> Figure | None:
    plt = _pyplot()
    if plt is None:
        return None
    index = range(len(layers))
    fig, (heads, ffn) = plt.subplots(2, 1, figsize=(8, 4.5), sharex=True)
    heads.bar(index, [layer["n_head"] for layer in layers], color=SERIES[0], label="query heads")
    heads.bar(index, [layer["n_head_kv"] for layer in layers], color=SERIES[1], width=0.4, label="KV heads")
    heads.set_ylabel("heads kept")
    heads.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ffn.bar(index, [layer["n_ff"] for layer in layers], color=SERIES[2])
    ffn.set_ylabel("FFN width kept")
    ffn.set_xlabel("layer")
    return Figure("layers", "Kept attention heads and FFN width per layer", _png(plt, fig))


def quality_plot(measured: list[tuple[str, ValidationReport]]) -> Figure | None:
    """PPL against file size, and KLD against file size where every run measured it: one labeled point per run."""
    plt = _pyplot()
    if plt is None:
        return None
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
    return Figure("quality", "Quality against file size, one point per run", _png(plt, fig))


def frontier_plot(curves: list[tuple[str, dict]]) -> Figure | None:
    """File size against estimated PPL increase for each plan's frontier (`curves`: a label and a plan's to_dict(),
    one per target): filled where a member meets the budgets, hollow where it breaks one, a star on the chosen one,
    a staircase through the members no other beats on these two axes alone, and the size budgets as lines. Targets
    of one model share many points: each curve's dots are bigger than the next one's, so none hides another."""
    plt = _pyplot()
    if plt is None:
        return None
    from edgeprune.build.frontier import non_dominated

    fig, ax = plt.subplots(figsize=(9, 4.8))
    budgets: dict[tuple[str, float], list[int]] = {}  # one line per budget, whichever targets share it
    for i, (label, plan) in enumerate(curves):
        color, members = SERIES[i % len(SERIES)], plan["frontier"]["members"]
        size = [m["file_mib"] for m in members]
        loss = [m["estimated_ppl_increase"] for m in members]
        meets = [m["meets_budgets"] for m in members]
        ax.scatter(size, loss, s=24 * (len(curves) - i), edgecolors=color, zorder=2 + i,  # a ring round a later one
                   facecolors=[color if ok else "none" for ok in meets], label=label if len(curves) > 1 else None)
        stairs = non_dominated(members, lambda m: (m["file_mib"], m["estimated_ppl_increase"]))
        ax.step([m["file_mib"] for m in stairs], [m["estimated_ppl_increase"] for m in stairs], where="post",
                color=color, linewidth=1)
        chosen = plan["chosen"]
        ax.scatter([chosen["file_mib"]], [chosen["estimated_ppl_increase"]], marker="*", s=220, color=color,
                   edgecolors="black", zorder=2 + len(curves))
        ax.annotate(f"chosen: {chosen['label']}", (chosen["file_mib"], chosen["estimated_ppl_increase"]),
                    textcoords="offset points", xytext=(8, 8), fontsize=8)
        for kind, limit in plan["frontier"]["budgets"].items():
            if limit is not None:
                budgets.setdefault((kind, limit), []).append(i)
    ax.set_yscale("symlog", linthresh=1)  # linear below +1%, logarithmic above: the big losses stay readable
    ax.margins(x=0.08, y=0.15)
    right, off_axis = ax.get_xlim()[1], 0
    for (kind, limit), users in budgets.items():
        color = "black" if len(curves) == 1 else SERIES[users[0] % len(SERIES)]
        text = f"{'memory' if kind == 'memory_mib' else 'file'} ≤ {limit:g} MiB"
        if limit <= right:
            ax.axvline(limit, color=color, linestyle="--" if kind == "memory_mib" else ":", linewidth=1)
            ax.text(limit, 0.98, f" {text}", transform=ax.get_xaxis_transform(), rotation=90, va="top", fontsize=8)
        else:  # far right of every member: named at the edge rather than squeezing the points
            ax.text(0.99, 0.98 - 0.06 * off_axis, f"{text} →", transform=ax.transAxes, ha="right", va="top",
                    fontsize=8, color=color)
            off_axis += 1
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("estimated PPL increase (%)")
    marks = [plt.Line2D([], [], marker="o", linestyle="", color="gray", label="meets the budgets"),
             plt.Line2D([], [], marker="o", linestyle="", color="gray", markerfacecolor="none", label="breaks one"),
             plt.Line2D([], [], marker="*", linestyle="", color="gray", markersize=12, label="chosen")]
    ax.legend(handles=ax.get_legend_handles_labels()[0] + marks, fontsize=8, loc="upper left",
              bbox_to_anchor=(1.0, 1.0))
    caption = ("The candidates no other beats on file size, estimated quality, decode speed, memory and TTFT together; "
               "the line joins those best on size and quality alone. The memory budget holds the file, the KV cache "
               "and the buffers, so a file left of its line may still break it")
    return Figure("frontier", caption, _png(plt, fig))
