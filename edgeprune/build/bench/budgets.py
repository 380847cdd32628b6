"""Budgets suite: does the model the planner picks meet every budget when it is built and measured?

SmolLM2-135M and Gemma 3 270M are exported (`export_model`, the same pipeline as `edgeprune export MODEL
--profile X` with no other flag) for every shipped profile, and SmolLM2 also for three profiles of this machine
whose budgets are tightened until quantization alone, then pruning, is needed. Shipped devices are judged as validation judges them off
the device: memory and file size measured here, speed from the cost model's device prediction. The host
profiles are judged on measured speed, since this machine is their device. An impossible budget is recorded
with the planner's one-line error.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

from converters import ConversionInput

from edgeprune.build.sizing import predict
from edgeprune.core.errors import EdgepruneError
from edgeprune.core.fetch import MODELS, fetch_smollm2
from edgeprune.build.hostprobe import measure_host_profile
from edgeprune.build.loading import load_model
from edgeprune.build.pipeline.export import export_model
from edgeprune.build.pipeline.options import ExportOptions
from edgeprune.device.profiles import Profile, list_profiles
from edgeprune.core.shapes import shape_of
from edgeprune.device.validation.results import MIB
from edgeprune.build.bench.tables import SuiteResult, table

EVAL_CHUNKS = 4  # perplexity is not what this suite judges; a few chunks keep each export short
CALIB_SEQUENCES = 32


def tightened_host_profiles(host: Profile, model_path: Path) -> list[Profile]:
    """Three host profiles, each tightening one budget against what the dense F16 model is predicted to do here.

    memory: 60% of the dense F16 memory, so only a 4-bit quant or pruning fits. decode: 1.5× the dense F16
    decode speed, beyond every 5-bit and larger type here. TTFT: 80% of the dense model's time to first token
    for a 512-token prompt; prefill is compute-bound and F16 is among the fastest types at it, so pruning
    must remove FLOPs.
    """
    loaded = load_model(model_path)
    source = ConversionInput(loaded.model, loaded.vocab, loaded.name, loaded.context_length)
    dense = predict(source, shape_of(loaded.model), "F16", host)
    long_prompt = dataclasses.replace(host, budgets=dataclasses.replace(host.budgets, ttft_prompt_tokens=512))
    dense_long = predict(source, shape_of(loaded.model), "F16", long_prompt)
    loose = dataclasses.replace(host.budgets, min_decode_tps=1.0, max_ttft_s=60.0, max_file_mib=None)
    tight = {
        "host-memory": dataclasses.replace(loose, memory_mib=round(0.6 * dense.memory_bytes / MIB)),
        "host-decode": dataclasses.replace(loose, min_decode_tps=round(1.5 * dense.decode_tps)),
        "host-ttft": dataclasses.replace(loose, ttft_prompt_tokens=512, max_ttft_s=round(0.8 * dense_long.ttft_s, 2)),
    }
    return [dataclasses.replace(host, name=name, budgets=budgets) for name, budgets in tight.items()]


def run(progress, models: tuple[str, ...] = ("smollm2", "gemma3")) -> SuiteResult:
    threads = os.cpu_count() or 1
    host = measure_host_profile(fetch_smollm2(), threads=threads, progress=progress)
    targets = [(name, MODELS[name](), p, False) for name in models for p in list_profiles()]
    if "smollm2" in models:
        targets += [("smollm2", fetch_smollm2(), p, True) for p in tightened_host_profiles(host, fetch_smollm2())]
    rows = []
    for model, model_path, profile, on_device in targets:
        progress(f"budgets: exporting {model} for {profile.name}")
        options = ExportOptions(eval_chunks=EVAL_CHUNKS, calib_sequences=CALIB_SEQUENCES, host_profile=host,
                                on_device=on_device, threads=threads)
        with tempfile.TemporaryDirectory(prefix="edgeprune-bench-budgets-") as out:
            try:
                result = export_model(model_path, profile, Path(out), options, progress=progress)
            except EdgepruneError as exc:
                rows.append({"model": model, "profile": profile.name, "budgets": dataclasses.asdict(profile.budgets),
                             "error": str(exc), "passed": None})
                continue
        report = result.report
        rows.append({
            "model": model, "profile": profile.name, "budgets": dataclasses.asdict(profile.budgets),
            "plan": result.plan.chosen.candidate.label(result.plan.base), "file_mib": report.memory.file_bytes / MIB,
            "ppl": report.perplexity.ppl, "kld": report.divergence.kld_mean if report.divergence else None,
            "checks": [dataclasses.asdict(c) for c in report.checks], "passed": report.passed,
            "seconds": result.seconds,
        })
    return SuiteResult(
        title=f"Budgets met: {' and '.join(models)} exported for each profile and validated on this machine",
        method=__doc__.strip().replace("\n", " ") + f" {threads} threads, {EVAL_CHUNKS}×512 evaluation tokens, "
               f"{CALIB_SEQUENCES}×256 calibration tokens.",
        data={"host_profile": dataclasses.asdict(host.device), "rows": rows},
        sections=["## Results", _table(rows)],
    )


def _check_cell(row: dict, name: str) -> str:
    check = next((c for c in row.get("checks", []) if c["name"] == name), None)
    if check is None:
        return "–"
    mark = "✓" if check["passed"] else "✗"
    relation = "≥" if name == "decode_tps" else "≤"
    basis = "" if check["basis"] == "measured here" else " (pred.)"
    return f"{mark} {check['measured']:.3g} {relation} {check['limit']:.3g}{basis}"


def _table(rows: list[dict]) -> str:
    names = ["memory", "decode_tps", "ttft", "file_size"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["model"], r["profile"], "impossible: " + r["error"], *["–"] * (len(names) + 2)])
            continue
        body.append([r["model"], r["profile"], r["plan"], f"{r['ppl']:.2f}", *(_check_cell(r, n) for n in names),
                     "PASS" if r["passed"] else "FAIL"])
    return table(["model", "profile", "plan", "PPL", "memory MiB", "decode tok/s", "TTFT s", "file MiB", "verdict"],
                 body)
