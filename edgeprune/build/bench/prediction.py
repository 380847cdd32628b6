"""Prediction suite: the cost model against llama.cpp on this machine, across quant types and pruned shapes.

This machine is measured as a device profile, as `profiles measure` does: bandwidth, compute, and
efficiencies per tensor type plus a fixed decode cost per layer, fitted on SmolLM2 at a ladder of quant types,
at half FFN width and at half depth. Every variant is a pruned SmolLM2 that the ladder never ran; it is
predicted from its GGUF alone and measured by llama.cpp: decode and prefill tokens/s, and total memory (file +
KV cache at the context + llama.cpp's compute buffer). The ladder and the variants are measured in the same
interleaved passes, so that a slow spell of this shared machine cannot make the calibration and the variants
disagree.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
from pathlib import Path

from converters import ConversionInput, write_gguf

from edgeprune.device.costmodel import predict_gguf
from edgeprune.core.fetch import fetch_gemma3, fetch_smollm2
from edgeprune.device.gguf_check import read_gguf
from edgeprune.build.hostprobe import fit_host_profile, measure_hardware, measure_interleaved, measured_runs, pooled_speed, write_ladder
from edgeprune.build.loading import load_model
from edgeprune.build.pruning import PruneOptions, prune_model
from edgeprune.build.quantize import quantize_gguf
from edgeprune.core.texts import default_calibration_text
from edgeprune.device.validation.results import MIB
from edgeprune.device.validation.speed import N_GEN, N_PROMPT, REPETITIONS
from edgeprune.build.bench.tables import SuiteResult, table

def _pruned(**options) -> PruneOptions:
    """Pruning that only shapes the file: speed and memory do not depend on which channels go or on recovery."""
    return PruneOptions(recovery="none", calib_sequences=4, **options)


# (label, quant, pruning): shapes and type mixes that the host profile's calibration ladder (dense SmolLM2 at
# each quant type) never ran, so every row tests a prediction rather than a fit.
VARIANTS = [
    ("F16, FFN -40% uniform", "F16", _pruned(ffn=0.4)),
    ("Q8_0, FFN -20% uniform", "Q8_0", _pruned(ffn=0.2)),
    ("Q6_K, -4 layers", "Q6_K", _pruned(layers=4)),
    ("Q5_K_M, FFN -40% adaptive", "Q5_K_M", _pruned(ffn=0.4, allocation="adaptive", align=256)),
    ("Q4_K_M, FFN -33% uniform", "Q4_K_M", _pruned(ffn=1 / 3, align=256)),
    ("Q4_0, FFN -30% heads -25% adaptive", "Q4_0", _pruned(ffn=0.3, heads=0.25, allocation="adaptive")),
    ("Q4_0, -8 layers, FFN -20% adaptive", "Q4_0", _pruned(layers=8, ffn=0.2, allocation="adaptive")),
    ("Q3_K_M, FFN -25% uniform", "Q3_K_M", _pruned(ffn=0.25, align=256)),
]
# The second real model, predicted from the same SmolLM2-fitted host profile: another family (gemma3, with
# sliding-window layers and a 262,144-token vocabulary whose logits fill the compute buffer).
GEMMA_VARIANTS = [
    ("Gemma 3 270M, Q8_0", "Q8_0", None),
    ("Gemma 3 270M, Q4_K_M, FFN -20% uniform", "Q4_K_M", _pruned(ffn=0.2, align=256)),
]
CONTEXT = 2048
PASSES = 3
LIMITS = {"decode": 0.10, "prefill": 0.20, "memory": 0.05}


def run(progress) -> SuiteResult:
    threads = os.cpu_count() or 1
    bandwidth, compute = measure_hardware(progress)
    loaded = load_model(fetch_smollm2(), progress=progress)
    tokens = loaded.tokenizer(default_calibration_text().content, add_special_tokens=False)["input_ids"]
    with tempfile.TemporaryDirectory(prefix="edgeprune-bench-pred-") as tmp:
        ladder = write_ladder(fetch_smollm2(), Path(tmp), threads=threads, progress=progress)
        built, architectures = [], []
        gemma = load_model(fetch_gemma3(), progress=progress)
        gemma_tokens = gemma.tokenizer(default_calibration_text().content, add_special_tokens=False)["input_ids"]
        variants = [(loaded, tokens, v) for v in VARIANTS] + [(gemma, gemma_tokens, v) for v in GEMMA_VARIANTS]
        for i, (source_model, ids, (label, quant, pruning)) in enumerate(variants):
            progress(f"prediction: building {label}")
            model = prune_model(copy.deepcopy(source_model.model), ids, pruning).model if pruning else source_model.model
            source = ConversionInput(model, source_model.vocab, source_model.name, source_model.context_length)
            path = write_gguf(source, Path(tmp) / f"variant-{i}-F16.gguf", "F16")
            if quant != "F16":
                path = quantize_gguf(path, Path(tmp) / f"variant-{i}-{quant}.gguf", quant).path
            built.append((label, path))
            architectures.append(read_gguf(path).architecture)
        del gemma
        measured = measure_interleaved(ladder + built, threads=threads, n_ctx=CONTEXT, passes=PASSES, progress=progress)
        host = fit_host_profile(measured_runs(ladder, measured[:len(ladder)]), bandwidth, compute, threads)
        rows = [_row(label, architecture, path, probes, host)
                for (label, path), architecture, probes in zip(built, architectures, measured[len(ladder):])]
        fitted = [_row(label, "llama", path, probes, host) for (label, path), probes in zip(ladder, measured)]
    within = {key: all(abs(r[key][0] / r[key][1] - 1) <= limit for r in rows) for key, limit in LIMITS.items()}
    return SuiteResult(
        title="Cost-model predictions against llama.cpp measurements on this machine (SmolLM2-135M and Gemma 3 "
              "270M variants)",
        method=__doc__.strip().replace("\n", " ") + f" Context {CONTEXT}, {threads} threads, llama-bench-style "
               f"pp{N_PROMPT} / tg{N_GEN}, median of {REPETITIONS}, in {PASSES} interleaved passes. The measurement is "
               "the median of all repetitions of all passes, which one slow pass cannot move far; 'repeat' is how far "
               "the passes' medians differ, the noise of this machine.",
        data={"host_profile": dataclasses.asdict(host.device), "rows": rows, "within_limits": within,
              "calibration_ladder": fitted},
        sections=["## Results", _table(rows), _verdict(rows, within),
                  "## The calibration ladder (what the host profile was fitted on: in-sample, not a test)",
                  _table(fitted)],
    )


def _row(label: str, architecture: str, path: Path, measured: list[dict], host) -> dict:
    predicted = predict_gguf(read_gguf(path), host)
    speeds = {key: [m["speed"][key] for m in measured] for key in ("decode_tps", "prefill_tps")}
    pooled = pooled_speed(measured)
    compute = max(m["compute_buffer_bytes"] for m in measured)
    return {
        "variant": label, "architecture": architecture, "file_mib": round(path.stat().st_size / MIB, 2),
        "decode": [predicted.decode_tps, pooled["decode_tps"]],
        "prefill": [predicted.prefill_tps, pooled["prefill_tps"]],
        "memory": [predicted.memory_bytes / MIB, (predicted.size.file_bytes + predicted.kv_cache_bytes + compute) / MIB],
        "repeat": {key: max(values) / min(values) - 1 for key, values in speeds.items()},
        "peak_rss_mib": max(m["peak_rss_bytes"] for m in measured) / MIB,
    }


def _error(pair: list[float]) -> str:
    predicted, measured = pair
    return f"{predicted:.1f} / {measured:.1f} ({100 * (predicted / measured - 1):+.1f}%)"


def _table(rows: list[dict]) -> str:
    return table(
        ["variant", "arch", "file MiB", "decode tok/s pred / meas", "repeat", "prefill tok/s pred / meas", "repeat",
         "memory MiB pred / meas", "peak RSS MiB"],
        [[r["variant"], r["architecture"], f"{r['file_mib']:.1f}", _error(r["decode"]),
          f"{100 * r['repeat']['decode_tps']:.1f}%", _error(r["prefill"]), f"{100 * r['repeat']['prefill_tps']:.1f}%",
          _error(r["memory"]), f"{r['peak_rss_mib']:.0f}"] for r in rows],
    )


def _verdict(rows: list[dict], within: dict) -> str:
    counts = {key: sum(abs(r[key][0] / r[key][1] - 1) <= limit for r in rows) for key, limit in LIMITS.items()}
    return "Within the targets (decode ±10%, prefill ±20%, memory ±5%): " + ", ".join(
        f"{key} {'yes' if ok else 'no'} ({counts[key]}/{len(rows)})" for key, ok in within.items())
