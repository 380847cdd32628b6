"""A validation report's files: the JSON (written by whoever made the report) and, beside it, the HTML and
Markdown pages."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def write_pages(document: dict, report_path: Path) -> list[Path]:
    """The HTML and Markdown pages of the report `document` beside its JSON `report_path`; returns every file of
    the report, the JSON first. The pages' plots need matplotlib, which a device install may lack: then only the
    JSON is there, and `edgeprune report` makes the pages elsewhere."""
    written = [report_path]
    if importlib.util.find_spec("matplotlib") is not None:
        from edgeprune.device.reporting.page import write_report_pages

        written += write_report_pages(document, report_path.parent, stem=report_path.stem)
    return written
