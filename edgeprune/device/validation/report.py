"""The validation's outputs: a short table for the terminal, and the report.json document."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgeprune.core.atomic import write_text_atomic
from edgeprune.device.validation.budgets import AT_LEAST
from edgeprune.device.validation.results import MIB, ValidationReport, with_stderr

REPORT_SCHEMA = 1  # report.json's layout: {"schema_version", sections..., "validation": ValidationReport}


def format_summary(report: ValidationReport) -> str:
    """A short table for the terminal; the JSON report holds everything."""
    ppl, speed, mem = report.perplexity, report.speed, report.memory
    lines = [
        f"GGUF        {report.gguf}",
        f"size        {mem.file_bytes / MIB:.1f} MiB, {mem.n_params / 1e6:.1f} M parameters",
        f"PPL         {with_stderr(ppl.ppl, ppl.ppl_stderr, 3)}  ({report.eval_text}: {ppl.chunks_text()}, "
        f"{ppl.n_tokens_scored} tokens scored; KV {ppl.kv_cache_type}, "
        f"flash attention {'on' if ppl.flash_attention else 'off'})",
    ]
    if (d := report.divergence) is not None:
        lines += [
            f"reference   {d.reference_gguf}  (PPL {d.reference_ppl:.3f})",
            f"KLD         mean {with_stderr(d.kld_mean, d.kld_stderr, 5)}  median {d.kld_median:.5f}  "
            f"p90 {d.kld_p90:.5f}  p99 {d.kld_p99:.5f}  max {d.kld_max:.5f}",
            f"top-1       {100 * d.top1_agreement:.2f}% same as reference;  Δp mean {100 * d.delta_p_mean:+.3f}%  "
            f"rms {100 * d.delta_p_rms:.3f}%",
        ]
    compute = f"{mem.compute_buffer_bytes / MIB:.1f} MiB" if mem.compute_buffer_bytes is not None else "unknown"
    kv_basis = "measured" if mem.basis.get("kv_cache", "").startswith("measured") else "computed"
    lines += [
        f"speed       prefill {speed.prefill_tps:.1f} tok/s (pp{speed.n_prompt}), decode {speed.decode_tps:.1f} tok/s "
        f"(tg{speed.n_gen}), median of {speed.repetitions}, {speed.threads} thread(s) on this machine",
        f"TTFT        {speed.ttft_s:.3f} s for a {speed.ttft_prompt_tokens}-token prompt",
        f"memory      {mem.total_bytes / MIB:.1f} MiB = file + KV cache {mem.kv_cache_bytes / MIB:.1f} MiB "
        f"({kv_basis}: ctx {mem.context_length}, {mem.kv_cache_type}, flash attention "
        f"{'on' if mem.flash_attention else 'off'}) + compute {compute};  peak RSS {mem.peak_rss_bytes / MIB:.1f} MiB",
    ]
    for label, p in (("predicted", report.predicted_device), ("host model", report.predicted_host)):
        if p is not None:
            lines.append(f"{label:<11} {p.device}: decode {p.decode_tps:.1f} tok/s, prefill {p.prefill_tps:.1f} tok/s, "
                         f"TTFT {p.ttft_s:.3f} s, memory {p.memory_bytes / MIB:.1f} MiB")
    for c in report.checks:
        op = ">=" if c.name in AT_LEAST else "<="
        lines.append(f"{'PASS' if c.passed else 'FAIL':<11} {c.name}: {c.measured:.3f} {c.unit} {op} {c.limit:g}"
                     f"  ({c.basis})")
    if report.passed is not None:
        lines.append(f"verdict     {'PASS' if report.passed else 'FAIL'}")
    return "\n".join(lines)


def write_report(path: str | Path, validation: ValidationReport | None, **sections: Any) -> dict:
    """The report document, JSON written atomically (a pipeline that reads reports never sees half of one):
    `schema_version`, the named sections (export, bundle, expected, ...) and the validation. Returns it."""
    document = {"schema_version": REPORT_SCHEMA, **sections,
                "validation": validation.to_dict() if validation is not None else None}
    write_text_atomic(path, json.dumps(document, indent=2) + "\n")
    return document
