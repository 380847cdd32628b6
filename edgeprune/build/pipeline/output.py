"""One output of a prepared model, stage by stage: plan → shape (prune, recover) → write float → calibrate →
quantize (mix) → validate → bundle → report. The stages that touch the weights are the route's
(`Prepared.route`: in memory or layer-streamed); the others are the same for both."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path

from edgeprune.build import plots
from edgeprune.build.mixed import choose_mix
from edgeprune.build.pipeline.options import RECOVERY_DIR, REPORT_NAME, ExportResult, Progress, output_stem, \
    provenance
from edgeprune.build.pipeline.prepared import Prepared
from edgeprune.build.pipeline.stages import Chosen, Files, FloatModel, Quantized, Run, Validated
from edgeprune.build.planner import Plan, make_plan
from edgeprune.core.errors import EdgepruneError
from edgeprune.device.bundle import BUNDLE_NAME, REFERENCE, Bundle, finish_bundle, start_bundle
from edgeprune.device.profiles import Profile
from edgeprune.device.llamacpp.quantizer import check_quant_type
from edgeprune.device.reporting.page import write_report_pages
from edgeprune.device.validation.entry import validate_gguf
from edgeprune.device.validation.report import write_report


def build_output(prepared: Prepared, profile: Profile | None, out_dir: Path, say: Progress, written: list[Path],
                 reference_topk: Path | None = None, scores=None) -> ExportResult:
    """Plan, prune, convert, quantize and validate one output of a prepared model into `out_dir`. The reference's
    evaluation logits come from `reference_topk` when given (shared by a build's targets, with the build's `scores`
    against it: a build.scorecache.ScoreCache), else from running the reference GGUF."""
    run = Run(prepared, profile, out_dir, say, written, provenance(prepared.model_path, profile),
              prepared.options.threads or os.cpu_count() or 1)
    chosen = choose(run)
    files = name_files(run, chosen)
    floated = float_model(run, chosen, files)  # shape (prune, recover) → write float → calibrate
    quantized = quantize(run, chosen, files, floated)
    validated = validate(run, files, reference_topk, scores) if profile is not None else None
    bundle = write_bundle(run, chosen, files, validated) if validated is not None else None
    return write_reports(run, chosen, files, floated, quantized, validated, bundle)


def choose(run: Run) -> Chosen:
    """What the output is: the planner's choice for the profile, or the options' (an explicit --quant narrows the
    planner's search; explicit pruning replaces it)."""
    prepared, profile, options = run.prepared, run.profile, run.prepared.options
    explicit_quant = check_quant_type(options.quant) if options.quant else None
    plan, quant, prune = None, explicit_quant, options.prune
    if profile is not None and prune is None:
        plan = make_output_plan(run, explicit_quant)
        quant, prune = plan.chosen.candidate.quant, plan.chosen.candidate.prune_options(prepared.base_shape)
    quant = quant or (profile.runtime.default_quant if profile is not None else "F16")
    mixing = plan.chosen.candidate.mixed if plan is not None else options.mix
    distillation = options.distill
    if distillation is None and plan is not None and plan.chosen.candidate.recovered:
        from edgeprune.build.pruning.distill import DistillOptions

        distillation = DistillOptions()  # the steps recovery_table.toml measured, which the plan's estimate assumes
    use_imatrix = quant != "F16" and options.imatrix and quant not in ("F32", "BF16")
    if mixing and not use_imatrix:
        raise EdgepruneError(f"--mix chooses quantized types with the importance matrix: it needs a quantized type "
                             f"(not {quant}) and the imatrix (drop --no-imatrix)")
    return Chosen(plan, quant, prune, mixing, distillation, use_imatrix)


def make_output_plan(run: Run, explicit_quant: str | None) -> Plan:
    """The planner's choice for the profile (`--search measured`: the best of its few best, built and scored)."""
    prepared, profile, say = run.prepared, run.profile, run.say
    if not prepared.route.can_recover and profile.budgets.recovery_minutes:
        say("recovery_minutes left unused: distillation trains the whole model in memory, which the "
            "layer-streamed path avoids (--streaming off if the model fits in RAM)")
    plan = prepared.timed("plan", make_plan, prepared.conversion_input(run.metadata), prepared.base_shape, profile,
                          quants=(explicit_quant,) if explicit_quant else None, mixed=prepared.options.mix,
                          can_recover=prepared.route.can_recover, progress=say)
    if prepared.options.search == "measured":
        from edgeprune.build.search import measured_plan

        plan = prepared.timed("search", measured_plan, plan, prepared.loaded, prepared.tokens, prepared.calib,
                              threads=run.threads, progress=say)
    say(f"plan: {plan.chosen.candidate.label(prepared.base_shape)}")
    return plan


def name_files(run: Run, chosen: Chosen) -> Files:
    """The output's names, each one this run creates registered for cleanup."""
    out_dir, stem = run.out_dir, output_stem(run.prepared.model_path)
    final = out_dir / f"{stem}-{chosen.quant}{'-mixed' if chosen.mixing else ''}.gguf"
    outputs = [final, out_dir / REPORT_NAME, out_dir / "report.html", out_dir / "report.md"]
    run.written.extend([path for path in outputs if not path.exists()])
    float_gguf = final if chosen.quant == "F16" else out_dir / f".{stem}-F16.intermediate.gguf"
    if float_gguf != final:
        run.written.append(float_gguf)
    return Files(stem, final, float_gguf)


def float_model(run: Run, chosen: Chosen, files: Files) -> FloatModel:
    """The float model to quantize and its importance matrix: the route's, or the F16 reference itself when the
    output is the unpruned model quantized (only its statistics are still wanted)."""
    prepared = run.prepared
    if chosen.prune is None and prepared.reference is not None and chosen.quant != "F16":
        return FloatModel(prepared.reference, None, prepared.unpruned_imatrix(run.say) if chosen.use_imatrix else None)
    return prepared.route.float_model(run, chosen, files.float_gguf)


def quantize(run: Run, chosen: Chosen, files: Files, floated: FloatModel) -> Quantized:
    """The float model quantized into the output (a type per tensor when mixing); the intermediate float GGUF is
    removed, whatever happens."""
    prepared, say = run.prepared, run.say
    quantized, mix = None, None
    try:
        if chosen.mixing:
            mix = prepared.timed("mix", choose_mix, floated.gguf, floated.imatrix, chosen.quant, run.profile,
                                 text=prepared.calib, threads=run.threads, progress=say)
            say(f"mixed precision: {mix.describe()}; bits per weight: {', '.join(mix.bits_by_kind)}; "
                f"{mix.against_named}")
        if chosen.quant != "F16":
            quantized = prepared.timed("quantize", prepared.quantize, floated.gguf, files.final, chosen.quant,
                                       floated.imatrix, run.threads, say, mix.types if mix else None)
    finally:
        if floated.gguf not in (files.final, prepared.reference):
            floated.gguf.unlink(missing_ok=True)
    return Quantized(quantized, mix)


def validate(run: Run, files: Files, reference_topk: Path | None, scores) -> Validated:
    """The output measured with llama.cpp against the reference, into a new validation bundle that keeps the
    reference's top-k log-probs (copied from `reference_topk`, or saved while scoring the reference)."""
    prepared, options = run.prepared, run.prepared.options
    partial = start_bundle(run.out_dir)
    run.written.append(partial)
    if reference_topk is not None:
        shutil.copyfile(reference_topk, partial / REFERENCE)
    report = prepared.timed(
        "validate", validate_gguf, files.final, reference_gguf=None if reference_topk else prepared.reference,
        reference_topk=reference_topk, save_topk=None if reference_topk else partial / REFERENCE,
        eval_text=prepared.evaluation, n_ctx=options.eval_ctx, max_chunks=options.eval_chunks,
        precision=options.eval_precision, threads=options.threads, profile=run.profile,
        host_profile=options.host_profile, on_device=options.on_device, scores=scores, progress=run.say)
    return Validated(report, partial)


def write_bundle(run: Run, chosen: Chosen, files: Files, validated: Validated) -> Bundle:
    """The validation bundle for the device: the output, its profile and what the host measured."""
    run.say("writing the validation bundle")
    if not (run.out_dir / BUNDLE_NAME).exists():
        run.written.append(run.out_dir / BUNDLE_NAME)
    return finish_bundle(validated.partial, files.final, run.profile.path, {
        "model": files.stem, "quant": chosen.quant, "profile": run.profile.name,
        "eval_text": run.prepared.evaluation.name, "host_validation": validated.report.to_dict(),
    })


def write_reports(run: Run, chosen: Chosen, files: Files, floated: FloatModel, quantized: Quantized,
                  validated: Validated | None, bundle: Bundle | None) -> ExportResult:
    """report.json (the validation and how the output was made) and its pages; the recovery cache is removed."""
    prepared, out_dir, say = run.prepared, run.out_dir, run.say
    report = validated.report if validated is not None else None
    export = export_record(run, chosen, files, floated, quantized, bundle)
    report_path = out_dir / REPORT_NAME
    document = write_report(report_path, report, export=export)
    say("writing the report pages")
    write_report_pages(document, out_dir, plots=plots)
    shutil.rmtree(out_dir / RECOVERY_DIR, ignore_errors=True)  # done: nothing left to resume
    return ExportResult(files.final, prepared.reference, report_path, report, quantized.result, chosen.plan,
                        prepared.timings, bundle.directory if bundle else None, prepared.resources)


def export_record(run: Run, chosen: Chosen, files: Files, floated: FloatModel, quantized: Quantized,
                  bundle: Bundle | None) -> dict:
    """report.json's "export": what was asked, chosen and done, and how long each stage took."""
    prepared, profile, imatrix = run.prepared, run.profile, floated.imatrix
    return {
        "model": str(prepared.model_path), "profile": profile.name if profile else None, "quant": chosen.quant,
        "gguf": files.final.name, "bundle": bundle.directory.name if bundle else None,
        "plan": chosen.plan.to_dict() if chosen.plan else None,
        "imatrix": {"used": imatrix is not None, "text": prepared.calib.name, "entries": len(imatrix or {}),
                    "sequences": prepared.options.calib_sequences},
        "fallbacks": [asdict(f) for f in quantized.result.fallbacks] if quantized.result else [],
        "pruning": floated.pruning, "seconds": prepared.timings, "resources": asdict(prepared.resources),
        "mixed": asdict(quantized.mix) if quantized.mix else None,
    }
