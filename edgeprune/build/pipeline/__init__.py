"""The export pipeline: model → calibration statistics → plan → pruned model → GGUF → quantized GGUF → report.

Each stage is its own module elsewhere in edgeprune; this package only wires them together so that the CLI and
Python users run the same steps. Every option and input is checked before the model is loaded and before any file
is written (`checks.check_export_inputs`); the lengths that need the tokenizer right after loading, still before
writing (`prepared.prepare`). A run that fails later removes the files it wrote, so a failed export leaves nothing
behind (`export.export_model`).

- `options`: what a run is asked for (`ExportOptions`) and what it returns (`ExportResult`), the output names.
- `checks`: the inputs checked before anything is loaded or written.
- `prepared`: what every output of one model shares (the model, the tokens, the F16 reference), made once.
- `stages`: what the stages of one output hand on to each other, and the contract of a path (`Route`).
- `inmemory`, `streamed`: the two paths, the whole model in memory or read layer by layer, chosen once.
- `output`: one output of a prepared model, stage by stage (`build_output`).
- `export`: `export_model`, the whole pipeline for `edgeprune export`.
"""
