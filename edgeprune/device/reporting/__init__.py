"""Readable pages from report.json: one run as HTML and Markdown, or several runs side by side.

A page is built once as a list of sections (tables and figures) and then rendered twice, so the HTML and the
Markdown always say the same thing. The HTML is self-contained (CSS inline, plots as base64 PNG): it can be
mailed or archived as one file and opens offline. The Markdown links the same PNGs, written next to it as
`<stem>-<plot>.png`, because Markdown viewers (GitHub among them) do not show data-URI images.

- `document`: report.json read (`load_report`, `Run`), the page's building blocks and the wording both pages share;
- `page`: one run's page (`write_report_pages`);
- `compare`: several runs side by side (`merge_reports`);
- the figures are drawn by whatever the caller passes as `plots=` (edgeprune.build.plots, with matplotlib where
  it is installed; the device side never imports matplotlib): without them the page has its tables and says
  that plots need matplotlib;
- `render`: the sections as HTML and Markdown, written to disk.
"""
