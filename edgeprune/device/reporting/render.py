"""Sections to files: the same sections as one self-contained HTML page and as Markdown with its PNGs beside it.

A plot that could not be drawn (None: matplotlib is not installed) is left out, and so is a section left empty
by it; the page then says, once under its title, that plots need matplotlib.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from edgeprune.core.atomic import atomic_output, write_text_atomic
from edgeprune.device.reporting.document import Figure, Section, Table

PLOTS_NEED_MATPLOTLIB = "No plots here: plots need matplotlib (`pip install matplotlib`), which is not installed."

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


def write_pages(title: str, sections: list[Section], out_html: Path, out_md: Path | None) -> list[Path]:
    """`out_html`, and `out_md` with its PNGs when given. Returns the paths written."""
    note = PLOTS_NEED_MATPLOTLIB if any(b is None for s in sections for b in s.blocks) else None
    sections = [Section(s.title, [b for b in s.blocks if b is not None]) for s in sections]
    sections = [s for s in sections if s.blocks]
    written = [out_html]
    write_text_atomic(out_html, _to_html(title, sections, note))
    if out_md is not None:
        for figure in _figures(sections):
            png = out_md.with_name(f"{out_md.stem}-{figure.name}.png")
            with atomic_output(png) as tmp:
                tmp.write_bytes(figure.png)
            written.append(png)
        write_text_atomic(out_md, _to_markdown(title, sections, out_md.stem, note))
        written.append(out_md)
    return written


def _figures(sections: list[Section]) -> list[Figure]:
    return [b for s in sections for b in s.blocks if isinstance(b, Figure)]


def _to_html(title: str, sections: list[Section], note: str | None) -> str:
    def cell(tag: str, text: str) -> str:
        result = text.split(" ")[0]
        css = f' class="{result.lower()}"' if tag == "td" and result in ("PASS", "FAIL") else ""
        return f"<{tag}{css}>{html.escape(text)}</{tag}>"

    parts = [f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
             f"<style>{CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    if note:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
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


def _to_markdown(title: str, sections: list[Section], stem: str, note: str | None) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    parts = [f"# {title}"]
    if note:
        parts.append(f"\n*{note}*")
    for section in sections:
        parts.append(f"\n## {section.title}\n")
        for block in section.blocks:
            if isinstance(block, Table):
                parts += [line(block.header), line(["---"] * len(block.header))] + [line(r) for r in block.rows]
                parts.append("")
            else:
                parts.append(f"![{block.caption}]({stem}-{block.name}.png)\n\n*{block.caption}*\n")
    return "\n".join(parts) + "\n"
