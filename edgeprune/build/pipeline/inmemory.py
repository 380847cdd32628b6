"""The in-memory route: the whole model loaded, pruned and recovered by distillation (on a copy when a build's
targets share it), written as F16, then calibrated on the written model."""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path

from converters import ConversionInput, write_gguf, writer_class

from edgeprune.build.calibration import collect_calibration
from edgeprune.build.loading import load_model
from edgeprune.build.pipeline.options import RECOVERY_DIR, Progress
from edgeprune.build.pipeline.stages import Chosen, FloatModel, Run
from edgeprune.build.planner import TIMED_HERE
from edgeprune.core.shapes import shape_of
from edgeprune.core.texts import read_text_file


class InMemory:
    """The model in RAM (and on the torch device): every stage works on the loaded model."""

    can_recover = True

    def load(self, prepared, model_path: str | Path, say: Progress) -> tuple[object, object]:
        loaded = prepared.timed("load", load_model, model_path, allow_pickle=prepared.options.allow_pickle,
                                progress=say)
        base_shape = shape_of(loaded.model)
        if prepared.device().type != "cpu":  # calibration and pruning where torch computes fastest
            loaded.model.to(prepared.device())
        return loaded, base_shape

    def conversion_input(self, loaded, metadata: dict[str, str], model=None) -> ConversionInput:
        return ConversionInput(model or loaded.model, loaded.vocab, loaded.name, loaded.context_length, metadata)

    def write_reference(self, prepared, path: Path, metadata: dict[str, str], say: Progress) -> Path:
        return prepared.timed("write_reference", write_gguf, self.conversion_input(prepared.loaded, metadata), path,
                              "F16", say)

    def calibration_model(self, prepared):
        return prepared.loaded.model

    def float_model(self, run: Run, chosen: Chosen, float_gguf: Path) -> FloatModel:
        model, pruning = shape(run, chosen)
        write_float(run, model, float_gguf)
        return FloatModel(float_gguf, pruning, calibrate(run, chosen, model) if chosen.use_imatrix else None)


def shape(run: Run, chosen: Chosen) -> tuple[object, dict | None]:
    """Prune the loaded model (a copy of it when a build's targets share it), recovering by distillation after
    each step when chosen: the model and report.json's "pruning", or the loaded model and None, unpruned."""
    prepared = run.prepared
    model = prepared.loaded.model
    if chosen.prune is None:
        return model, None
    from edgeprune.build.pruning import prune_model

    recovery = Distillation(prepared, chosen.distillation, model, run.out_dir, run.say, _unchecked_budget(run, chosen),
                            chosen.prune.steps) if chosen.distillation is not None else None
    pruned = prepared.timed("prune", prune_model, copy.deepcopy(model) if prepared.shared else model,
                            prepared.tokens, chosen.prune, progress=run.say, recover=recovery)
    details = _prune_summary(pruned)
    if recovery is not None:
        details["distillation"] = recovery.summary()
    return pruned.model, details


def _unchecked_budget(run: Run, chosen: Chosen) -> float | None:
    """The recovery budget the export still has to time its recovery against: none where the planner chose this
    recovery, for it timed the same one on this machine and kept it within the budget."""
    from edgeprune.build.pruning.distill import DistillOptions

    plan = chosen.plan
    if plan is not None and plan.chosen.candidate.recovered and plan.recovery_basis == TIMED_HERE \
            and chosen.distillation == DistillOptions():
        return None
    return run.profile.budgets.recovery_minutes if run.profile is not None else None


def write_float(run: Run, model, float_gguf: Path) -> None:
    prepared = run.prepared
    prepared.timed("write_float", write_gguf, prepared.conversion_input(run.metadata, model), float_gguf, "F16",
                   run.say)


def calibrate(run: Run, chosen: Chosen, model) -> dict:
    """The importance matrix of the model written: the unpruned one's is computed once for all targets."""
    prepared, options = run.prepared, run.prepared.options
    if chosen.prune is None:
        return prepared.unpruned_imatrix(run.say)
    return prepared.timed("calibrate", collect_calibration, model, prepared.tokens, n_seq=options.calib_sequences,
                          seq_len=options.calib_seq_len, text_name=prepared.calib.name,
                          progress=run.say).gguf_imatrix()


class Distillation:
    """Recovery by distillation after each pruning step (edgeprune.build.pruning.distill): the teacher, the unpruned
    model, is run once over the recovery text's windows before pruning, its outputs cached under the output
    directory with the checkpoints an interrupted run resumes from (a build caches them once for its targets). With a
    budget (recovery_minutes), a recovery timed on this machine to take longer is refused before it starts."""

    def __init__(self, prepared, options, teacher, out_dir: Path, say: Progress, budget_minutes: float | None = None,
                 rounds: int = 1):
        from edgeprune.build.pruning.distill import TeacherCache, estimate, windows
        from edgeprune.core.texts import recovery_texts

        self.options, self.say, self.results = options, say, []
        self.directory = out_dir / RECOVERY_DIR
        texts = ([read_text_file(prepared.options.recovery_text, "recovery")] if prepared.options.recovery_text
                 else recovery_texts())
        self.text = " + ".join(t.name for t in texts)
        if budget_minutes is not None:
            timed = estimate(teacher, self.options, rounds)
            timed.check(budget_minutes)
            say(f"distillation: about {timed.minutes:.1f} min on this machine, within a budget of {budget_minutes:g}")
        say(f"distillation: windows of {self.text}")
        train, held = windows(texts, prepared.loaded.tokenizer, self.options, teacher.config.bos_token_id)
        with prepared.lock:  # a build's targets share one cache: the first builds it, the others reuse it
            self.cache = prepared.timed("teacher", TeacherCache.build, teacher, train, held, self.options.top_k,
                                        prepared.teacher_dir or self.directory / "teacher", say)

    def __call__(self, model, step: int) -> None:
        from edgeprune.build.pruning.distill import distill

        self.results.append(distill(model, self.cache, self.options, self.directory / f"step-{step}.pt", self.say))

    def summary(self) -> dict:
        return {"text": self.text, "options": asdict(self.options), "steps": [asdict(r) for r in self.results]}


def _prune_summary(result) -> dict:
    return {
        "architecture": writer_class(result.model.config, result.shape).arch_name,
        "removed_params": result.removed_params,
        "decoder_params_before": result.decoder_params_before,
        "layers": [asdict(layer) for layer in result.shape.layers],
        "details": result.details,
    }
