"""A validation report's files: the JSON (written by whoever made the report) and, beside it, the HTML and
Markdown pages."""

from __future__ import annotations

from pathlib import Path

from edgeprune.device.reporting.document import Plots
from edgeprune.device.reporting.page import write_report_pages


def write_pages(document: dict, report_path: Path, plots: Plots | None) -> list[Path]:
    """The HTML and Markdown pages of the report `document` beside its JSON `report_path`; returns every file of
    the report, the JSON first. Without matplotlib (a device install) the pages have the tables and a note."""
    return [report_path, *write_report_pages(document, report_path.parent, stem=report_path.stem, plots=plots)]
