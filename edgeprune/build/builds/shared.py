"""The work a build does once for every target, kept between builds under `<out>/.shared` while its inputs hold:
the unpruned F16 reference and the reference's evaluation logits with the scores against them."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from edgeprune.build.builds.buildfile import BuildFile
from edgeprune.build.builds.buildkey import digest
from edgeprune.core.atomic import write_text_atomic

SHARED = ".shared"
Progress = Callable[[str], None]


def shared_reference(prepared, shared_dir: Path, key: str, metadata: dict, say: Progress) -> Path:
    """The unpruned F16 reference, written once per model and texts (kept between builds)."""
    path, stamp = shared_dir / "reference-F16.gguf", shared_dir / "reference.key"
    if path.is_file() and stamp.is_file() and stamp.read_text() == key:
        say("reference: up to date")
        prepared.reference = path
        return path
    stamp.unlink(missing_ok=True)
    prepared.write_reference(path, metadata, say)
    write_text_atomic(stamp, key)
    return path


def shared_topk(reference: Path, evaluation, build: BuildFile, shared_dir: Path, threads, say: Progress):
    """The reference's top-k log-probs on the evaluation text, scored once for every target's KL divergence, and
    the build's `ScoreCache` against them, which starts with the reference's own scores (an unpruned F16 target's)."""
    from edgeprune.device.bundle_logits import DEFAULT_TOP_K
    from edgeprune.device.gguf_check import read_gguf
    from edgeprune.device.llamacpp.runtime import Runtime
    from edgeprune.build.scorecache import ScoreCache
    from edgeprune.device.validation.quality import measure_perplexity

    path, stamp, scores_dir = shared_dir / "reference-topk.npz", shared_dir / "reference-topk.key", shared_dir / "scores"
    key = digest({"reference": (shared_dir / "reference.key").read_text(), "ctx": build.eval_ctx,
                  "chunks": build.eval_chunks, "precision": build.eval_precision, "top_k": DEFAULT_TOP_K})
    scores = ScoreCache(scores_dir, key)
    if path.is_file() and stamp.is_file() and stamp.read_text() == key:
        return path, scores
    stamp.unlink(missing_ok=True)
    shutil.rmtree(scores_dir, ignore_errors=True)  # scored against top-k log-probs about to be replaced
    say("scoring the reference's evaluation logits once for every target")
    partial = shared_dir / f".reference-topk-{os.getpid()}.npz"
    runtime = Runtime(build.eval_ctx, threads=threads or os.cpu_count() or 1)
    perplexity, divergence = measure_perplexity(reference, evaluation, save_topk=partial, against_saved=True,
                                                n_ctx=build.eval_ctx, max_chunks=build.eval_chunks, runtime=runtime,
                                                progress=say)
    scores.put(read_gguf(reference), runtime, perplexity, dataclasses.replace(divergence, reference_gguf=str(path)))
    partial.replace(path)
    write_text_atomic(stamp, key)
    return path, scores
