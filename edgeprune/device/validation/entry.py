"""`validate_gguf`: one GGUF measured with llama.cpp (quality, speed, memory) and judged against a profile's budgets.

llama.cpp runs with the profile's runtime, so the memory and speed measured are those of the program the device
will run. Off the device, speed is judged on the cost model's prediction for it: this machine says nothing about
the device's speed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

from edgeprune.core.texts import Text, default_evaluation_text
from edgeprune.device.gguf_check import read_gguf
from edgeprune.device.llamacpp.child import print_to_stderr
from edgeprune.device.llamacpp.runtime import Runtime
from edgeprune.device.validation.budgets import budget_value, check_budgets, verdict
from edgeprune.device.validation.machine import machine_record
from edgeprune.device.validation.memory import memory_result
from edgeprune.device.validation.quality import check_evaluation_options, measure_perplexity
from edgeprune.device.validation.results import (DivergenceResult, PerplexityResult, Predicted, SpeedResult,
                                                 ValidationReport)
from edgeprune.device.validation.speed import N_PROMPT, measure_speed

Quality = tuple[PerplexityResult, DivergenceResult | None]


class Scores(Protocol):
    """Scores kept across a build's targets (edgeprune.build.scorecache.ScoreCache): a file's perplexity and
    divergence, measured by `measure` only if no target scored the same file before; the flag says whether they
    were reused."""

    def scores(self, info: Any, runtime: Runtime, measure: Callable[[], Quality]
               ) -> tuple[PerplexityResult, DivergenceResult | None, bool]: ...


def validate_gguf(
    gguf_path: str | Path,
    *,
    reference_gguf: str | Path | None = None,
    reference_topk: str | Path | None = None,
    save_topk: str | Path | None = None,
    eval_text: Text | None = None,
    n_ctx: int = 512,
    max_chunks: int | None = 20,
    precision: float | None = None,
    threads: int | None = None,
    profile: Any = None,
    host_profile: Any = None,
    on_device: bool = False,
    scores: Scores | None = None,
    progress: Callable[[str], None] = print_to_stderr,
) -> ValidationReport:
    """Measure one GGUF with llama.cpp and, when a device `profile` is given, judge it against its budgets.

    llama.cpp runs with the profile's runtime (`Runtime.of`): its context length, KV cache type, flash attention
    and threads. Memory and file size are judged as measured. Speed is judged as measured only `on_device`;
    elsewhere this machine says nothing about the device's speed, so the cost model's prediction for the device
    is judged. A `host_profile` (from `edgeprune profiles measure`) adds predictions for this machine.
    Perplexity and divergence are scored with `Runtime.for_scoring`, on `max_chunks` chunks or, with a
    `precision`, until their standard errors are within that share of them, and taken from `scores` (a build's, against
    `reference_topk`) when another target's file had the same tensors.
    """
    budgets = profile.budgets if profile is not None else None
    check_evaluation_options(n_ctx, max_chunks, precision)
    path = Path(gguf_path)
    progress(f"checking {path}")
    info = read_gguf(path)
    if reference_gguf is not None:
        read_gguf(reference_gguf)
    text = eval_text or default_evaluation_text()
    runtime = Runtime.of(profile, threads=threads, default_context=n_ctx)
    ttft_tokens = budget_value(budgets, "ttft_prompt_tokens") or N_PROMPT
    progress(f"llama.cpp runtime: {runtime.describe()}")

    def measure() -> Quality:
        return measure_perplexity(path, text, reference_gguf=reference_gguf, reference_topk=reference_topk,
                                  save_topk=save_topk, n_ctx=n_ctx, max_chunks=max_chunks, precision=precision,
                                  runtime=scoring,
                                  progress=progress)

    scoring = runtime.for_scoring()
    perplexity, divergence = _quality(info, runtime, scoring, measure, scores, progress)
    probe = measure_speed(path, runtime=runtime, ttft_tokens=ttft_tokens, progress=progress)
    speed = SpeedResult(**probe["speed"])
    memory = memory_result(path, probe, runtime)
    device = Predicted.of(info, profile) if profile is not None else None
    host = Predicted.of(info, host_profile) if host_profile is not None else None
    checks = check_budgets(speed, memory, budgets, None if on_device else device) if budgets is not None else []
    return ValidationReport(
        gguf=str(path), eval_text=text.name, perplexity=perplexity, divergence=divergence, speed=speed,
        memory=memory, checks=checks, passed=verdict(checks, budgets), predicted_device=device,
        predicted_host=host, machine=machine_record(runtime.threads, probe["llama_cpp"]), on_device=on_device,
    )


def _quality(info: Any, runtime: Runtime, scoring: Runtime, measure: Callable[[], Quality], scores: Scores | None,
             progress: Callable[[str], None]) -> Quality:
    """The file's perplexity and divergence, scored with `scoring`: measured, or reused from `scores`."""
    if scoring != runtime:
        progress(f"scoring quality with {scoring.describe()}: flash attention changes speed, not the file's quality")
    if scores is None:
        return measure()
    perplexity, divergence, reused = scores.scores(info, scoring, measure)
    if reused:
        progress("these tensors were scored with this KV cache type earlier in the build: their perplexity and "
                 "divergence are reused")
    return perplexity, divergence
