"""`edgeprune report`: several validation reports merged into one comparison page."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("reports", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_path", type=click.Path(path_type=Path), required=True,
              help="The comparison page to write (PAGE.html; PAGE.md is written beside it).")
def report(reports, out_path):
    """Merge validation reports (report.json files, or directories holding one) into one comparison page: one
    file on several devices, or several files on one device."""
    from edgeprune.build import plots  # matplotlib where installed; it imports no torch, so a device install runs it
    from edgeprune.device.reporting.compare import merge_reports
    from edgeprune.device.reporting.document import load_report

    written = merge_reports([load_report(r) for r in reports], out_path, out_path.with_suffix(".md"), plots=plots)
    click.echo("wrote " + ", ".join(str(p) for p in written))
