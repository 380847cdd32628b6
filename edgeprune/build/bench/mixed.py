"""Mixed precision suite: edgeprune's per-tensor types against llama.cpp's named types at the same file size, on
weights that were never quantized.

For each model and named type (with edgeprune's importance matrix) the mix is solved in that file's bytes and
quantized by llama.cpp with per-tensor overrides; every file is scored against the F16 reference on held-out text.
Both real models come from quantized GGUFs whose weights sit on a grid one type re-creates almost exactly (SmolLM2
on Q4_1's, Gemma 3 270M on Q5_0's and Q8_0's), so the suite measures each moved off its grid by a fixed permutation
of channels that leaves the function unchanged (bench.offgrid).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np

from converters import ConversionInput, write_gguf

from edgeprune.build.bench.offgrid import offgrid_gemma3, offgrid_smollm2
from edgeprune.build.calibration import collect_calibration
from edgeprune.core.atomic import write_text_atomic
from edgeprune.device.llamacpp.quantizer import dry_run_types
from edgeprune.build.hostprobe import measure_host_profile
from edgeprune.build.mixed import LEAST_FILL, SAMPLE_EVERY, Sensitivity, measure_sensitivity, solve
from edgeprune.build.quantize import quantize_gguf
from edgeprune.core.shapes import shape_of
from edgeprune.core.texts import default_calibration_text, default_evaluation_text
from edgeprune.device.validation.quality import measure_perplexity
from edgeprune.device.validation.results import MIB
from edgeprune.device.validation.speed import measure_speed
from edgeprune.build.bench.quantization import CALIB_SEQ_LEN, CALIB_SEQUENCES, EVAL_CHUNKS, EVAL_CTX
from edgeprune.build.bench.tables import SuiteResult, table

COMMAND = "python -m edgeprune.build.bench mixed"
MIXED_TABLE = Path(__file__).resolve().parents[1] / "mixed_table.toml"
TARGETS = ("Q4_K_M", "Q4_0", "Q3_K_M")
# the table's key, the model's name and how to load it; the first model's rows are the planner's default ones
# EDGEPRUNE_MIXED_MODELS=smollm2 runs one; the table keeps the rows of the models not run
MODELS = (("smollm2", "SmolLM2-135M-Instruct off its Q4_1 grid", offgrid_smollm2),
          ("gemma3", "Gemma 3 270M off its Q5_0 and Q8_0 grids", offgrid_gemma3))
SPEEDUP = 1.10  # the speed-budget row asks for this much more decode speed than the unconstrained mix's
ESTIMATORS = {"kld": "each kind's error priced in KLD (the one edgeprune.build.mixed solves with)",
              "weighted": "imatrix-weighted errors summed one to one", "plain": "plain squared errors summed"}


def run(progress) -> SuiteResult:
    calibration, evaluation = default_calibration_text(), default_evaluation_text()
    threads = len(os.sched_getaffinity(0))  # the cores this process may use (taskset): llama.cpp spins on more
    wanted = os.environ.get("EDGEPRUNE_MIXED_MODELS", ",".join(key for key, _, _ in MODELS)).split(",")
    rows, models, speed_row = [], {}, None
    for key, name, load in (m for m in MODELS if m[0] in wanted):
        with tempfile.TemporaryDirectory(prefix="edgeprune-bench-mixed-") as tmp:
            tmp = Path(tmp)
            loaded = load(progress)
            shape = shape_of(loaded.model)
            reference = write_gguf(ConversionInput(loaded.model, loaded.vocab, loaded.name, loaded.context_length),
                                   tmp / "F16.gguf", "F16", progress)
            tokens = loaded.tokenizer(calibration.content, add_special_tokens=False)["input_ids"]
            imatrix = collect_calibration(loaded.model, tokens, n_seq=CALIB_SEQUENCES, seq_len=CALIB_SEQ_LEN,
                                          text_name=calibration.name, progress=progress).gguf_imatrix()
            del loaded
            sensitivity = measure_sensitivity(reference, imatrix, text=calibration, threads=threads,
                                              progress=progress)
            models[key] = {"name": name, "shape": shape.table_key,
                           "sensitivity_seconds": sensitivity.seconds, "kld_per_error": sensitivity.kld_per_error}
            topk = tmp / "reference-topk.npz"

            def measure(label: str, path: Path, **row) -> dict:
                """The reference's logits are scored once, kept as top-k log-probs (mean KLD within 1% of the
                full logits' on SmolLM2, bench topk), and every later file is compared with them."""
                progress(f"mixed: {name}: {label}: perplexity and KLD")
                against = ({"reference_topk": topk} if topk.exists()
                           else {"reference_gguf": reference, "save_topk": topk})
                ppl, divergence = measure_perplexity(path, evaluation, n_ctx=EVAL_CTX, max_chunks=EVAL_CHUNKS,
                                                     threads=threads, progress=progress, **against)
                speed = measure_speed(path, threads=threads, progress=progress)["speed"]
                types = {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(path).tensors
                         if len(t.shape) == 2}
                known = all(any(o.type_name == t for o in sensitivity.options[n]) for n, t in types.items())
                result = {"model": key, "label": label, **row, "mib": path.stat().st_size / MIB, "ppl": ppl.ppl,
                          "kld": divergence.kld_mean, "reference_ppl": divergence.reference_ppl,
                          "top1": divergence.top1_agreement, "decode_tps": speed["decode_tps"],
                          **{f"estimated_{e}": sensitivity.damage(types, e) if known else None for e in ESTIMATORS}}
                rows.append(result)
                return result

            for quant in TARGETS:
                named = quantize_gguf(reference, tmp / f"{quant}.gguf", quant, imatrix=imatrix, threads=threads,
                                      progress=progress)
                measure(f"{quant} + imatrix", named.path, target=quant, kind="named")
                start = time.perf_counter()
                size = named.path.stat().st_size
                plan = solve(sensitivity, max_file_bytes=size, min_file_bytes=int(LEAST_FILL * size))
                solve_seconds = time.perf_counter() - start
                mixed = quantize_gguf(reference, tmp / f"{quant}-mixed.gguf", quant, imatrix=imatrix,
                                      threads=threads, tensor_types=plan.types, progress=progress)
                measure(f"mix at {quant}'s size", mixed.path, target=quant, kind="mix",
                        solve_seconds=round(solve_seconds, 2), bits_by_kind=plan.bits_by_kind)
                mixed.path.unlink()
                named.path.unlink()
            if key == MODELS[0][0]:  # the decode-budget row is the default model's: one machine, one budget
                speed_row = _speed_budget_row(sensitivity, reference, imatrix, tmp, threads, measure, progress)
    write_text_atomic(MIXED_TABLE, mixed_table_toml(rows, models, time.strftime("%Y-%m-%d"), _table_now()))
    progress(f"mixed: wrote {MIXED_TABLE}")
    estimators = {key: _estimator_check([r for r in rows if r["model"] == key]) for key in models}
    return SuiteResult(
        title="Mixed precision by sensitivity on weights never quantized: per-tensor types against llama.cpp's "
              "named types at equal size",
        method=(
            f"Models: {'; '.join(m['name'] for m in models.values())}, each written as an F16 GGUF, the reference. "
            f"Importance matrix: edgeprune's calibration pass ({CALIB_SEQUENCES}×{CALIB_SEQ_LEN} tokens of "
            f"'{calibration.name}'). Sensitivity: one in {SAMPLE_EVERY} of every tensor's rows quantized by llama.cpp "
            f"to each candidate type with that imatrix, the imatrix-weighted squared error measured, and each kind's "
            f"error priced in KLD by quantizing that kind alone and measuring the file on the calibration text. "
            f"Each named row is llama.cpp's type with the imatrix; each mix is solved in that file's bytes and "
            f"quantized by llama.cpp with per-tensor overrides. PPL, mean KLD and top-1 agreement against the F16 "
            f"reference on '{evaluation.name}' ({EVAL_CHUNKS} chunks of {EVAL_CTX} tokens; the reference's top-k "
            f"log-probs with tail draws, as a validation bundle keeps them); decode tok/s llama-bench style, on "
            f"{threads} threads. "
            f"Command: `{COMMAND}`."
        ),
        data={"rows": rows, "models": models, "speed_budget": speed_row, "estimators": estimators},
        sections=["## Mixes against named types at the same size", _table(rows), _gains(rows, models),
                  "## Which estimator predicts the measured KLD", _estimator_text(estimators, models),
                  "## A decode-speed budget", _speed_text(speed_row)],
    )


def _speed_budget_row(sensitivity: Sensitivity, reference: Path, imatrix: dict, tmp: Path, threads: int, measure,
                      progress) -> dict:
    """This machine's measured per-type decode efficiencies; a budget SPEEDUP× the unconstrained mix's predicted
    decode speed at Q4_K_M's size rules out the slowest kernels where they are read."""
    host = measure_host_profile(reference, threads=threads, progress=progress)
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
    cells = [[r["model"], r["label"], f"{r['mib']:.2f}", f"{r['ppl']:.3f}", f"{r['kld']:.5f}", f"{100 * r['top1']:.2f}%",
              f"{r['decode_tps']:.1f}"] for r in rows]
    return table(["model", "file", "MiB", "PPL", "KLD mean vs F16", "top-1 vs F16", "decode tok/s"], cells)


def _gains(rows: list[dict], models: dict) -> str:
    lines = []
    for key, model in models.items():
        for quant in TARGETS:
            named = next(r for r in rows if r["model"] == key and r["target"] == quant and r["kind"] == "named")
            for r in rows:
                if r["model"] == key and r["target"] == quant and r["kind"] == "mix":
                    lines.append(f"- **{model['name']}, {r['label']}**: KLD {100 * (r['kld'] / named['kld'] - 1):+.1f}% "
                                 f"against {named['label']} ({r['mib']:.2f} against {named['mib']:.2f} MiB, "
                                 f"{100 * r['mib'] / named['mib']:.1f}% of its bytes); bits per "
                                 f"weight {', '.join(r['bits_by_kind'][:4])}, …")
    return "\n".join(lines)


def _estimator_check(rows: list[dict]) -> dict:
    """Spearman rank correlation of each estimator's predicted damage with the measured KLD over one model's files."""
    scored = [r for r in rows if r["estimated_kld"] is not None]
    measured = _ranks([r["kld"] for r in scored])
    return {"files": len(scored), **{e: float(np.corrcoef(_ranks([r[f"estimated_{e}"] for r in scored]), measured)[0, 1])
                                     for e in ESTIMATORS}}


def _ranks(values: list[float]) -> np.ndarray:
    return np.argsort(np.argsort(values)).astype(float)


def _estimator_text(estimators: dict, models: dict) -> str:
    lines = []
    for key, check in estimators.items():
        lines.append(f"- {models[key]['name']}, over {check['files']} files: "
                     + "; ".join(f"{check[e]:.3f} for {text}" for e, text in ESTIMATORS.items()))
    return "Rank correlation of estimated damage with measured KLD:\n" + "\n".join(lines)


def _speed_text(row: dict | None) -> str:
    if row is None:
        return f"Not measured: the decode-budget row is {MODELS[0][1]}'s, and this run left it out."
    slow = sorted(row["efficiency"].items(), key=lambda kv: kv[1])[:3]
    return (f"This machine's measured decode efficiencies, slowest first: "
            f"{', '.join(f'{t} {e:.2f}' for t, e in slow)}. Budget: {row['budget_tps']:.1f} tok/s "
            f"({SPEEDUP:.2f}× the unconstrained mix's predicted {row['unconstrained_predicted_tps']:.1f}). The mix "
            f"chosen under it: predicted {row['predicted_tps']:.1f} tok/s, measured {row['measured_tps']:.1f} tok/s, "
            f"KLD {row['kld']:.5f}; bits per weight {', '.join(row['bits_by_kind'][:4])}, ….")


def _loss(row: dict) -> float:
    return math.log(row["ppl"] / row["reference_ppl"])


def _table_now() -> str:
    return MIXED_TABLE.read_text(encoding="utf-8") if MIXED_TABLE.is_file() else ""


def _section_lines(table_text: str, header: str) -> list[str]:
    """The lines of `header`'s section in a table's text, as written (comments included), up to the next blank."""
    lines = table_text.splitlines()
    if header not in lines:
        return []
    rest = lines[lines.index(header) + 1:]
    return rest[:rest.index("")] if "" in rest else rest


def mixed_table_toml(rows: list[dict], models: dict, date: str, previous: str) -> str:
    """The planner's quality rows for mixes (edgeprune.build.planner.load_quality_table): the share of its named
    type's Δ log PPL against the F16 reference that the mix at that type's size keeps, per model (matched by shape);
    the first model's are [mix], the default for any other. A model not run keeps its rows from the `previous`
    table's text, with the measurements their comments give."""
    def header(key: str) -> str:
        return "[mix]" if key == MODELS[0][0] else f"[models.{key}]"

    def section(key: str) -> list[str]:
        if key not in models:
            return _section_lines(previous, header(key))
        named = {r["target"]: r for r in rows if r["model"] == key and r["kind"] == "named"}
        return ([f"shape = {models[key]['shape']}"] if key != MODELS[0][0] else []) + [
            f"{r['target']} = {_loss(r) / _loss(named[r['target']]):.4f}  # PPL {r['ppl']:.3f}, {r['mib']:.2f} MiB; "
            f"{r['target']} itself: PPL {named[r['target']]['ppl']:.3f}, {named[r['target']]['mib']:.2f} MiB; "
            f"F16 {r['reference_ppl']:.3f}"
            for r in rows if r["model"] == key and r["kind"] == "mix"]

    (first, first_name, _), *others = MODELS
    lines = [
        "# Quality loss of a mixed-precision plan (edgeprune.build.mixed) in each named type's bytes, as the share of",
        "# the named type's Δ log(perplexity) against the F16 model that the mix keeps (the planner multiplies the",
        "# named type's quality_table.toml row by it). Written by",
        f"# `{COMMAND}` (edgeprune/build/bench/mixed.py): rerun it rather than edit. The built-in evaluation",
        f"# text, {EVAL_CHUNKS} chunks of {EVAL_CTX} tokens. [mix]: {first_name}, whose weights were never quantized",
        "# as far as a mix can tell; [models.*]: other models, matched by shape (vocabulary, width, layers).",
        "",
        header(first),
        *section(first),
    ]
    for key, _, _ in others:
        if key in models or _section_lines(previous, header(key)):
            lines += ["", header(key), *section(key)]
    lines += ["", "[measured]", f'command = "{COMMAND}"', f'date = "{date}"']
    return "\n".join(lines) + "\n"
