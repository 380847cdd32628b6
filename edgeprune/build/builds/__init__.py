"""Profile-driven builds: one build file, every target device, the shared work done once, runtimes handed off.

`edgeprune build` reads a build file (TOML, `edgeprune init` writes a commented one), loads the model once,
writes the F16 reference and scores its evaluation logits once, then plans, prunes, converts, quantizes and
validates each target into `<out>/<target>/` with the GGUF, the validation bundle, the report and the runtime
hand-off (`edgeprune.build.handoff`). Every target's output is keyed by a content hash of everything it depends on
(the model files, the texts, the target's profile file and effective profile, the evaluation settings, the
planner's measured tables, the digest of edgeprune's own code (`codedigest`), the versions of llama.cpp and the
other libraries): a build with nothing changed rebuilds nothing. A target's build.json, its cache entry, records
those inputs, so a rebuild says which of them changed; it is written last, so a killed build leaves no entry that
looks whole, and the next build rebuilds that target. None of it goes into the GGUF.

- `buildfile`: the build file, its schema and the commented example `edgeprune init` writes.
- `buildkey`: the versions and hashes of a target's inputs, its cache key, and what changed since the last build.
- `outcome`: what a build returns, target by target.
- `shared`: the work done once for every target: the F16 reference and its evaluation logits.
- `target`: one target built into its directory, renamed into place when whole.
- `runner`: `run_build`, the targets in a thread pool.
- `manifest`: manifest.json and the index page comparing the targets.
"""
