"""Recovery suite: how much of the loss of a deep cut distillation from the dense model wins back on SmolLM2-135M
(EDGEPRUNE_RECOVERY_MODEL=gemma3: Gemma 3 270M, EDGEPRUNE_RECOVERY_STEPS=N, fewer steps to fit a time budget, and
EDGEPRUNE_RECOVERY_LR are reported only; recovery_table.toml is SmolLM2's with the default recipe).

At 30% and 50% of decoder parameters removed (MLP channels, edgeprune's default pruning), three ways: one-shot
retraining-free (the ridge reconstruction only), one-shot then distillation, and iterative (three pruning steps,
each re-scored after the distillation of the one before, a third of the distillation steps each;
EDGEPRUNE_RECOVERY_ITERATIVE=0 leaves it out). Every model is written as an F16 GGUF and measured by
llama.cpp on both held-out texts, the odd Python reference topics and The Tempest; its KL divergence against the
dense F16 model on the first. Distillation trains on texts.recovery_texts, which hold neither.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import tempfile
import time
import tomllib
from pathlib import Path

from converters import ConversionInput, write_gguf

from edgeprune.core.atomic import write_text_atomic
from edgeprune.core.errors import EdgepruneError
from edgeprune.core.fetch import MODELS
from edgeprune.build.loading import load_model
from edgeprune.build.pruning import PruneOptions, prune_model
from edgeprune.build.pruning.distill import DistillOptions, TeacherCache, distill, windows
from edgeprune.core.shapes import ModelShape, shape_of
from edgeprune.core.texts import default_calibration_text, default_evaluation_text, recovery_texts, tempest_text
from edgeprune.device.validation.quality import measure_perplexity
from edgeprune.device.validation.results import MIB
from edgeprune.build.bench.pruning import split_budget
from edgeprune.build.bench.tables import SuiteResult, table

# the shares of decoder parameters removed; EDGEPRUNE_RECOVERY_RATIOS=0.3 runs one (each costs about 25 minutes)
RATIOS = tuple(float(r) for r in os.environ.get("EDGEPRUNE_RECOVERY_RATIOS", "0.3,0.5").split(","))
CHUNKS = 10  # 512-token chunks of each held-out text, as the pruning suite
ITERATIVE_STEPS = 3
ITERATIVE = os.environ.get("EDGEPRUNE_RECOVERY_ITERATIVE", "1") != "0"
MODEL = os.environ.get("EDGEPRUNE_RECOVERY_MODEL", "smollm2")
# distillation steps per recovery and learning rate (DistillOptions' defaults unless set): fewer steps fit a larger
# model in a time budget
STEPS = int(os.environ.get("EDGEPRUNE_RECOVERY_STEPS", DistillOptions.steps))
LEARNING_RATE = float(os.environ.get("EDGEPRUNE_RECOVERY_LR", DistillOptions.learning_rate))
COMMAND = "python -m edgeprune.build.bench recovery"
RECOVERY_TABLE = Path(__file__).resolve().parents[1] / "recovery_table.toml"


def run(progress) -> SuiteResult:
    if MODEL not in MODELS:
        raise EdgepruneError(f"EDGEPRUNE_RECOVERY_MODEL={MODEL} is not a bench model: use one of {', '.join(MODELS)}")
    threads = os.cpu_count() or 1
    loaded = load_model(MODELS[MODEL](), progress=progress)
    dense = loaded.model
    calib_ids = loaded.tokenizer(default_calibration_text().content, add_special_tokens=False)["input_ids"]
    texts = [default_evaluation_text(), tempest_text()]
    options = DistillOptions(steps=STEPS, learning_rate=LEARNING_RATE)
    recovery = recovery_texts()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="edgeprune-bench-recovery-") as tmp:
        tmp = Path(tmp)
        progress("recovery: the teacher's top-k on the recovery windows")
        start = time.perf_counter()
        train, held = windows(recovery, loaded.tokenizer, options, dense.config.bos_token_id)
        cache = TeacherCache.build(dense, train, held, options.top_k, tmp / "teacher", progress)
        teacher_seconds = time.perf_counter() - start
        reference = write_gguf(ConversionInput(dense, loaded.vocab, loaded.name, loaded.context_length),
                               tmp / "dense-F16.gguf", "F16", progress)

        def measure(label: str, ratio: float, model, seconds: float, **extra) -> None:
            path = reference if model is dense else write_gguf(
                ConversionInput(model, loaded.vocab, loaded.name, loaded.context_length), tmp / "model-F16.gguf", "F16")
            row = {"label": label, "ratio": ratio, "seconds": round(seconds, 1), "mib": path.stat().st_size / MIB,
                   **extra}
            for i, text in enumerate(texts):
                progress(f"recovery: {label}: perplexity on {text.name}")
                against = {"reference_gguf": reference} if i == 0 and model is not dense else {}
                ppl, divergence = measure_perplexity(path, text, max_chunks=CHUNKS, threads=threads, progress=progress,
                                                     **against)
                row[f"ppl {text.name}"] = ppl.ppl
                if i == 0:
                    row["kld"] = divergence.kld_mean if divergence else 0.0
            rows.append(row)

        measure("dense", 0.0, dense, 0.0)
        for ratio in RATIOS:
            _, ffn = split_budget(ratio, 0.0, dense)
            methods = [("one-shot", 1, False), ("one-shot + distillation", 1, True)]
            if ITERATIVE:
                methods.append((f"iterative ×{ITERATIVE_STEPS} + distillation", ITERATIVE_STEPS, True))
            for label, steps, distilled in methods:
                progress(f"recovery: {ratio:.0%}, {label}")
                results = []
                per_step = dataclasses.replace(options, steps=options.steps // steps)  # the same budget in all

                def recover(model, step: int) -> None:
                    results.append(distill(model, cache, per_step, tmp / f"step-{step}.pt", progress))
                    (tmp / f"step-{step}.pt").unlink(missing_ok=True)

                start = time.perf_counter()
                pruned = prune_model(copy.deepcopy(dense), calib_ids, PruneOptions(ffn=ffn, steps=steps),
                                     progress=progress, recover=recover if distilled else None)
                measure(label, ratio, pruned.model, time.perf_counter() - start,
                        removed=pruned.removed_params / pruned.decoder_params_before,
                        distill_steps=sum(r.steps for r in results),
                        distill_seconds=round(sum(r.seconds for r in results), 1),
                        held_out_loss=[r.held_out_loss for r in results])
                del pruned
    names = [t.name for t in texts]
    if MODEL == "smollm2" and options == DistillOptions():
        write_text_atomic(RECOVERY_TABLE, recovery_table_toml(rows, names[0], options, teacher_seconds,
                                                              shape_of(dense), time.strftime("%Y-%m-%d")))
        progress(f"recovery: wrote {RECOVERY_TABLE}")
    return SuiteResult(
        title=f"Recovery by distillation on {loaded.name}: one-shot, one-shot + distillation"
              + (", iterative" if ITERATIVE else ""),
        method=(f"{__doc__.split(chr(10) + chr(10))[1].replace(chr(10), ' ')} Distillation: {options}, on "
                f"{' + '.join(repr(t.name) for t in recovery)} (teacher top-k cached once, {teacher_seconds:.0f} s). "
                f"{CHUNKS} chunks of 512 tokens per held-out text, {threads} threads. Wall time: pruning and "
                f"distillation, on this machine. Command: `{COMMAND}`."),
        data={"rows": rows, "options": options.__dict__, "teacher_seconds": teacher_seconds},
        sections=[table(["removed", "method", "F16 MiB", *(f"PPL {n}" for n in names), "KLD vs dense",
                         "gap closed", "distill steps", "wall s"], _cells(rows, names))],
    )


def _cells(rows: list[dict], names: list[str]) -> list[list]:
    """One line per model; "gap closed" is the share of the one-shot model's PPL gap to the dense model that the
    row wins back, per held-out text."""
    dense = rows[0]
    out = []
    for row in rows:
        one_shot = next((r for r in rows if r["ratio"] == row["ratio"] and r["label"] == "one-shot"), None)
        closed = "–"
        if one_shot is not None and row is not one_shot:
            closed = " / ".join(f"{_closed(one_shot[f'ppl {n}'], row[f'ppl {n}'], dense[f'ppl {n}']):.0%}"
                                for n in names)
        out.append([f"{row['ratio']:.0%}" if row["ratio"] else "–", row["label"], f"{row['mib']:.1f}",
                    *(f"{row[f'ppl {n}']:.2f}" for n in names), f"{row['kld']:.4f}", closed,
                    row.get("distill_steps", "–"), f"{row['seconds']:.0f}"])
    return out


def _closed(one_shot: float, recovered: float, dense: float) -> float:
    return (one_shot - recovered) / (one_shot - dense)


def recovery_table_toml(rows: list[dict], text: str, options: DistillOptions, teacher_seconds: float,
                        shape: ModelShape, date: str) -> str:
    """The planner's rows for recovered candidates (edgeprune.build.planner.load_quality_table): Δ log PPL against the
    dense model of one-shot pruning + distillation, per share of decoder parameters removed, and what recovery
    cost here. Points at ratios this run did not measure are kept from the table it replaces."""
    dense = rows[0][f"ppl {text}"]
    recovered = [r for r in rows if r["label"] == "one-shot + distillation"]
    points = {round(r["removed"], 6): [round(r["removed"], 6), round(math.log(r[f"ppl {text}"] / dense), 5)]
              for r in recovered}
    if RECOVERY_TABLE.is_file():
        for share, loss in tomllib.loads(RECOVERY_TABLE.read_text(encoding="utf-8"))["recovered"]["uniform"][1:]:
            points.setdefault(round(share, 6), [share, loss])
    # seconds per step of the slowest measured cut (the least pruned trains slowest), the evaluations included
    per_step = max(r["distill_seconds"] / r["distill_steps"] for r in recovered)
    curve = [[0.0, 0.0], *(points[k] for k in sorted(points))]
    lines = [
        "# Estimated quality loss of a pruned model recovered by distillation (edgeprune.build.pruning.distill), as",
        "# Δ log(perplexity) against the dense model, the measure of quality_table.toml. Written by",
        f"# `{COMMAND}` (edgeprune/build/bench/recovery.py): rerun it rather than edit.",
        f"# SmolLM2-135M-Instruct, MLP channels, one-shot pruning then {options.steps} distillation steps",
        f"# (DistillOptions' defaults: {options.label_weight:g} of the loss on the text's next tokens); PPL on {text},",
        f"# {CHUNKS} chunks of 512 tokens (quality_table.toml's 20 chunks put the one-shot",
        "# models within 0.03 of this suite's). [cost] is what recovery took on the 2-core machine that measured it,",
        "# the teacher's pass included; the planner scales it by the weights a token's pass multiplies by",
        "# (ModelShape.pass_params: decoder and output head).",
        "",
        "[recovered]",
        "# share of decoder parameters removed from MLP channels -> Δ log PPL, per allocation",
        f"uniform = {curve}",
        "",
        "[cost]",
        f"steps = {options.steps}",
        f"seconds_per_step = {per_step:.2f}",
        f"teacher_seconds = {teacher_seconds:.0f}",
        f"pass_params = {shape.pass_params()}",
        "",
        "[measured]",
        f'command = "{COMMAND}"',
        f'date = "{date}"',
        "# the model measured (vocabulary, width, layers): the planner marks recovered estimates of others extrapolated",
        f"shape = {shape.table_key}",
    ]
    return "\n".join(lines) + "\n"
