"""The export pipeline: model → calibration statistics → plan → pruned model → GGUF → quantized GGUF → report.

Each stage is its own module; this one only wires them together so that the CLI and Python users run the
same steps. Every option and input is checked before the model is loaded and before any file is written
(`check_export_inputs`); the lengths that need the tokenizer right after loading, still before writing. A run
that fails later removes the files it wrote, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import copy
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from converters import ConversionInput, write_gguf, writer_class

from edgeprune.core.atomic import atomic_output, ensure_writable_dir
from edgeprune.device.bundle import BUNDLE_NAME, REFERENCE, finish_bundle, start_bundle
from edgeprune.build.calibration import check_calibration_length, collect_calibration
from edgeprune.core.errors import EdgepruneError
from edgeprune.build.loading import layer_count, load_model, open_model
from edgeprune.build.mixed import choose_mix
from edgeprune.build.planner import Plan, check_search_options, make_plan
from edgeprune.device.profiles import Profile
from edgeprune.device.reporting.page import write_report_pages
from edgeprune.build.resources import Resources, plan_resources
from edgeprune.build.quantize import QuantizeResult, quantize_gguf
from edgeprune.device.llamacpp.quantizer import QUANT_TYPES, check_quant_type
from edgeprune.core.shapes import shape_of
from edgeprune.build.streaming import LazyLayers, check_streamable, compute_device, conversion_input, lazy_shape, stream_write
from edgeprune.core.texts import Text, calibration_text, check_evaluation_length, check_recovery_length, evaluation_text, \
    read_text_file
from edgeprune.device.validation.entry import validate_gguf
from edgeprune.device.validation.quality import check_evaluation_options
from edgeprune.device.validation.report import format_summary, write_report
from edgeprune.device.validation.results import ValidationReport

Progress = Callable[[str], None]
REFERENCE_NAME = "reference-F16.gguf"
REPORT_NAME = "report.json"
RECOVERY_DIR = ".edgeprune-recovery"  # the teacher's cached outputs and distillation checkpoints, kept until done


@dataclass
class ExportOptions:
    quant: str | None = None  # None: the planner's choice for the profile (F16 without a profile)
    calib: Path | None = None  # None: the built-in offline calibration text
    eval: Path | None = None  # None: the built-in offline evaluation text
    imatrix: bool = True
    calib_sequences: int = 64
    calib_seq_len: int = 256
    eval_ctx: int = 512
    eval_chunks: int = 20
    threads: int | None = None
    allow_pickle: bool = False
    host_profile: Profile | None = None  # this machine's measured profile: predictions next to measurements
    on_device: bool = False  # validation runs on the target device itself: judge measured speed
    prune: object | None = None  # edgeprune.build.pruning.PruneOptions; None: the planner decides
    search: str = "estimated"  # "measured": build the planner's best few and keep the one llama.cpp scores best
    streaming: str = "auto"  # "on": read the model layer by layer (edgeprune.build.streaming); "off": all in RAM
    device: str | None = None  # torch device for calibration and recovery; None: a CUDA GPU if present, else CPU
    mix: bool = False  # mixed precision (edgeprune.build.mixed): the planner's mixed candidates, or a mix at --quant's size
    distill: object | None = None  # edgeprune.build.pruning.distill.DistillOptions: recover a pruned model by distillation
    recovery_text: Path | None = None  # None: texts.recovery_texts (Shakespeare but The Tempest, calibration half)


@dataclass
class ExportResult:
    gguf: Path
    reference_gguf: Path | None  # None without a profile: nothing to validate against
    report_path: Path
    report: ValidationReport | None
    quantization: QuantizeResult | None  # None for an F16 output
    plan: Plan | None
    seconds: dict[str, float] = field(default_factory=dict)
    bundle: Path | None = None  # the validation bundle for the device; None without a profile
    resources: Resources | None = None  # the path taken and its memory and disk estimates

    @property
    def summary(self) -> str:
        lines = [f"plan        {self.plan.chosen.candidate.label(self.plan.base)}"] if self.plan else []
        if self.report is not None:
            lines.append(format_summary(self.report))
        return "\n".join(lines)


def export_model(model_path: str | Path, profile: Profile | None, out_dir: str | Path,
                 options: ExportOptions | None = None, progress: Progress | None = None) -> ExportResult:
    """Run the whole pipeline. With a profile and no explicit pruning, the planner chooses quant and pruning
    (an explicit --quant narrows its search); without a profile, nothing is planned or validated."""
    options = options or ExportOptions()
    say = progress or (lambda _msg: None)
    out_dir = Path(out_dir)
    calib, evaluation, resources = check_export_inputs(model_path, profile, out_dir, options)
    say(resources.describe())
    written: list[Path] = []
    try:
        return _export(model_path, profile, out_dir, options, say, calib, evaluation, resources, written)
    except BaseException:
        for path in written:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise


def check_export_inputs(model_path: str | Path, profile: Profile | None, out_dir: Path,
                        options: ExportOptions) -> tuple[Text, Text | None, Resources]:
    """Everything that can be checked without loading the model, in the order a user reads the flags: a bad flag
    costs seconds and writes nothing. Returns the calibration and evaluation texts, read and checked, and the
    path (in memory or layer-streamed) with its memory and disk estimates, refused if this machine lacks them."""
    if options.quant:
        check_quant_type(options.quant)
    check_search_options(options.search, options.mix, profile)
    if options.prune is not None:
        options.prune.validate(layer_count(model_path))
    if profile is not None:
        check_evaluation_options(options.eval_ctx, options.eval_chunks)
    calib = calibration_text(options.calib)
    check_calibration_length(len(calib.content.encode("utf-8")), options.calib_seq_len)
    evaluation = evaluation_text(options.eval) if profile is not None else None
    if evaluation is not None:  # no token covers less than a byte; the BOS is added
        check_evaluation_length(evaluation.name, len(evaluation.content.encode("utf-8")) + 1, options.eval_ctx,
                                options.eval_chunks, upper_bound=True)
    if options.recovery_text is not None:  # with the other texts, before the model is loaded
        from edgeprune.build.pruning.distill import DistillOptions

        check_recovery_length(read_text_file(options.recovery_text, "recovery"),
                              (options.distill or DistillOptions()).seq_len)
    ensure_writable_dir(out_dir)
    pruning = options.prune is not None or profile is not None
    resources = plan_resources(
        model_path, out_dir, options.streaming, pruning=pruning, reference=profile is not None,
        quantized=(options.quant or "F16") != "F16" or profile is not None,
        calibration_tokens=max(options.calib_sequences, getattr(options.prune, "calib_sequences", 0)) * options.calib_seq_len)
    compute_device(options.device)
    if resources.streamed:
        if options.search == "measured":
            raise EdgepruneError("--search measured builds whole candidate models in memory, which the layer-streamed "
                                 "path avoids: use --search estimated, or --streaming off if the model fits in RAM")
        if options.prune is not None:
            check_streamable(options.prune)
        if options.distill is not None:
            raise EdgepruneError("distillation trains the whole pruned model in memory, which the layer-streamed path "
                                 "avoids: use --streaming off if the model fits in RAM, or drop --distill-steps")
    if options.distill is not None:
        options.distill.validate()
    return calib, evaluation, resources


@dataclass
class Prepared:
    """What every output built from one model shares, computed once: the model (loaded, or opened for the
    layer-streamed path), the tokenized calibration text, the F16 reference and the unpruned model's importance
    matrix. `edgeprune build` prepares once for all its targets."""

    model_path: Path
    loaded: object  # LoadedModel, or LazyModel on the layer-streamed path
    base_shape: object  # ModelShape
    tokens: list[int]
    calib: Text
    evaluation: Text | None
    resources: Resources
    options: ExportOptions
    timings: dict[str, float] = field(default_factory=dict)
    reference: Path | None = None
    shared: bool = False  # several targets: in-memory pruning works on a copy of the model
    teacher_dir: Path | None = None  # a build's cache of the teacher's outputs for every target's distillation
    cache: dict = field(default_factory=dict)  # shared by per-target copies (dataclasses.replace)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def timed(self, stage: str, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.timings[stage] = round(time.perf_counter() - start, 2)
        return result

    def conversion_input(self, metadata: dict[str, str], model=None) -> ConversionInput:
        if self.resources.streamed:
            return conversion_input(self.loaded, metadata)
        loaded = self.loaded
        return ConversionInput(model or loaded.model, loaded.vocab, loaded.name, loaded.context_length, metadata)

    def device(self):
        return compute_device(self.options.device)

    def write_reference(self, path: Path, metadata: dict[str, str], say: Progress) -> Path:
        """The unpruned model as F16: the reference for KL divergence, and the float input of unpruned outputs."""
        if self.resources.streamed:
            self.reference = self.timed("write_reference", stream_write, self.loaded, path, metadata,
                                        device=self.device(), progress=say).gguf
        else:
            self.reference = self.timed("write_reference", write_gguf, self.conversion_input(metadata), path, "F16",
                                        say)
        return self.reference

    def unpruned_imatrix(self, say: Progress) -> dict:
        """The unpruned model's importance matrix, computed on first use (once for all of a build's targets)."""
        with self.lock:
            if "imatrix" not in self.cache:
                model = LazyLayers(self.loaded, self.device()) if self.resources.streamed else self.loaded.model
                self.cache["imatrix"] = self.timed(
                    "calibrate", collect_calibration, model, self.tokens, n_seq=self.options.calib_sequences,
                    seq_len=self.options.calib_seq_len, text_name=self.calib.name, progress=say).gguf_imatrix()
        return self.cache["imatrix"]

    def quantize(self, float_gguf: Path, final: Path, quant: str, imatrix: dict | None, threads: int,
                 say: Progress, tensor_types: dict[str, str] | None = None) -> QuantizeResult:
        """Quantize `float_gguf` into `final`. The unpruned reference is quantized once per type: a later target
        wanting the same copies the first one's file, the bytes llama.cpp would write again (SmolLM2 to Q5_K_M
        with its importance matrix: 9.6 s in the build bench; copying the 105 MB it writes: 0.1-1.1 s here).
        A mixed-precision target (`tensor_types`) is its own."""
        def run() -> QuantizeResult:
            return quantize_gguf(float_gguf, final, quant, imatrix=imatrix, imatrix_text=self.calib.name,
                                 threads=threads, tensor_types=tensor_types, progress=say)

        if float_gguf != self.reference or tensor_types:
            return run()
        with self.lock:
            done = self.cache.setdefault("quantized", {}).get((quant, imatrix is not None))
            if done is not None and done.path.is_file():
                say(f"{quant}: the unpruned model's, quantized for an earlier target")
                with atomic_output(final) as tmp:
                    shutil.copyfile(done.path, tmp)
                return replace(done, path=final)
            self.cache["quantized"][(quant, imatrix is not None)] = result = run()
            return result


def prepare(model_path: str | Path, options: ExportOptions, calib: Text, evaluation: Text | None,
            resources: Resources, say: Progress) -> Prepared:
    """Load (or open) the model and tokenize the texts, checking their lengths with the model's tokenizer."""
    prepared = Prepared(Path(model_path), None, None, [], calib, evaluation, resources, options)
    if resources.streamed:
        loaded = prepared.timed("load", open_model, model_path, progress=say)
        base_shape = lazy_shape(loaded)
    else:
        loaded = prepared.timed("load", load_model, model_path, allow_pickle=options.allow_pickle, progress=say)
        base_shape = shape_of(loaded.model)
        if prepared.device().type != "cpu":  # calibration and pruning where torch computes fastest
            loaded.model.to(prepared.device())
    prepared.loaded, prepared.base_shape = loaded, base_shape
    say("tokenizing calibration text")
    prepared.tokens = loaded.tokenizer(calib.content, add_special_tokens=False)["input_ids"]
    check_calibration_length(len(prepared.tokens), options.calib_seq_len)
    if evaluation is not None:
        say("tokenizing evaluation text")
        eval_tokens = len(loaded.tokenizer(evaluation.content, add_special_tokens=False)["input_ids"]) + 1
        check_evaluation_length(evaluation.name, eval_tokens, options.eval_ctx, options.eval_chunks)
    return prepared


def provenance(model_path: Path, profile: Profile | None) -> dict[str, str]:
    """The edgeprune.* metadata every GGUF of a run carries."""
    metadata = {"edgeprune.source": Path(model_path).name}
    if profile is not None:
        metadata["edgeprune.profile"] = profile.name
    return metadata


def _export(model_path, profile: Profile | None, out_dir: Path, options: ExportOptions, say: Progress, calib: Text,
            evaluation: Text | None, resources: Resources, written: list[Path]) -> ExportResult:
    """export_model's stages; every file it creates is appended to `written` first, for the caller's cleanup
    (files an earlier run left under the same names are not this run's to remove)."""
    prepared = prepare(model_path, options, calib, evaluation, resources, say)
    if profile is not None:
        if not (out_dir / REFERENCE_NAME).exists():
            written.append(out_dir / REFERENCE_NAME)
        prepared.write_reference(out_dir / REFERENCE_NAME, provenance(prepared.model_path, profile), say)
    return build_output(prepared, profile, out_dir, say, written)


def build_output(prepared: Prepared, profile: Profile | None, out_dir: Path, say: Progress, written: list[Path],
                 reference_topk: Path | None = None, scores=None) -> ExportResult:
    """Plan, prune, convert, quantize and validate one output of a prepared model into `out_dir`. The reference's
    evaluation logits come from `reference_topk` when given (shared by a build's targets, with the build's `scores`
    against it: a validate.ScoreCache), else from running the reference GGUF."""
    options, model_path, base_shape = prepared.options, prepared.model_path, prepared.base_shape
    explicit_quant = check_quant_type(options.quant) if options.quant else None
    threads = options.threads or os.cpu_count() or 1  # quantization runs here, on this machine's cores
    timings = prepared.timings
    metadata = provenance(model_path, profile)
    plan, quant, prune = None, explicit_quant, options.prune
    if profile is not None and prune is None:
        if prepared.resources.streamed and profile.budgets.recovery_minutes:
            say("recovery_minutes left unused: distillation trains the whole model in memory, which the "
                "layer-streamed path avoids (--streaming off if the model fits in RAM)")
        plan = prepared.timed("plan", make_plan, prepared.conversion_input(metadata), base_shape, profile,
                              quants=(explicit_quant,) if explicit_quant else None, mixed=options.mix,
                              can_recover=not prepared.resources.streamed, progress=say)
        if options.search == "measured":
            from edgeprune.build.search import measured_plan

            plan = prepared.timed("search", measured_plan, plan, prepared.loaded, prepared.tokens, prepared.calib,
                                  threads=threads, progress=say)
        say(f"plan: {plan.chosen.candidate.label(base_shape)}")
        quant, prune = plan.chosen.candidate.quant, plan.chosen.candidate.prune_options(base_shape)
    quant = quant or (profile.runtime.default_quant if profile is not None else "F16")
    mixing = plan.chosen.candidate.mixed if plan is not None else options.mix
    distillation = options.distill
    if distillation is None and plan is not None and plan.chosen.candidate.recovered:
        from edgeprune.build.pruning.distill import DistillOptions

        distillation = DistillOptions()  # the steps recovery_table.toml measured, which the plan's estimate assumes
    reference = prepared.reference
    stem = output_stem(model_path)
    use_imatrix = quant != "F16" and options.imatrix and quant not in ("F32", "BF16")
    if mixing and not use_imatrix:
        raise EdgepruneError(f"--mix chooses quantized types with the importance matrix: it needs a quantized type "
                             f"(not {quant}) and the imatrix (drop --no-imatrix)")
    final = out_dir / f"{stem}-{quant}{'-mixed' if mixing else ''}.gguf"
    outputs = [final, out_dir / REPORT_NAME, out_dir / "report.html", out_dir / "report.md"]
    written += [path for path in outputs if not path.exists()]
    float_gguf = final if quant == "F16" else out_dir / f".{stem}-F16.intermediate.gguf"
    if float_gguf != final:
        written.append(float_gguf)
    prune_details, imatrix = None, None
    if prune is None and reference is not None and quant != "F16":
        float_gguf = reference  # the reference is the float model: only its statistics are still wanted
        imatrix = prepared.unpruned_imatrix(say) if use_imatrix else None
    elif prepared.resources.streamed:
        build = stream_write(prepared.loaded, float_gguf, metadata, token_ids=prepared.tokens, options=prune,
                             device=prepared.device(), progress=say,
                             imatrix=(options.calib_sequences, options.calib_seq_len, prepared.calib.name)
                             if use_imatrix else None)
        timings.update(build.seconds)
        prune_details, imatrix = build.pruning, build.stats.gguf_imatrix() if build.stats else None
    else:
        model = prepared.loaded.model
        if prune is not None:
            from edgeprune.build.pruning import prune_model

            recovery = Distillation(prepared, distillation, model, out_dir, say) if distillation is not None else None
            pruned = prepared.timed("prune", prune_model, copy.deepcopy(model) if prepared.shared else model,
                                    prepared.tokens, prune, progress=say, recover=recovery)
            model, prune_details = pruned.model, _prune_summary(pruned)
            if recovery is not None:
                prune_details["distillation"] = recovery.summary()
        prepared.timed("write_float", write_gguf, prepared.conversion_input(metadata, model), float_gguf, "F16", say)
        if use_imatrix:
            imatrix = prepared.unpruned_imatrix(say) if prune is None else prepared.timed(
                "calibrate", collect_calibration, model, prepared.tokens, n_seq=options.calib_sequences,
                seq_len=options.calib_seq_len, text_name=prepared.calib.name, progress=say).gguf_imatrix()

    quantized, mix = None, None
    try:
        if mixing:
            mix = prepared.timed("mix", choose_mix, float_gguf, imatrix, quant, profile, threads=threads, progress=say)
            say(f"mixed precision: {mix.describe()}; bits per weight: {', '.join(mix.bits_by_kind)}; "
                f"{mix.against_named}")
        if quant != "F16":
            quantized = prepared.timed("quantize", prepared.quantize, float_gguf, final, quant, imatrix, threads, say,
                                       mix.types if mix else None)
    finally:
        if float_gguf not in (final, reference):
            float_gguf.unlink(missing_ok=True)
    report, validation_bundle, evaluation = None, None, prepared.evaluation
    if profile is not None:
        partial = start_bundle(out_dir)
        written.append(partial)
        if reference_topk is not None:
            shutil.copyfile(reference_topk, partial / REFERENCE)
        report = prepared.timed(
            "validate", validate_gguf, final, reference_gguf=None if reference_topk else reference,
            reference_topk=reference_topk, save_topk=None if reference_topk else partial / REFERENCE,
            eval_text=evaluation, n_ctx=options.eval_ctx, max_chunks=options.eval_chunks, threads=options.threads,
            profile=profile, host_profile=options.host_profile, on_device=options.on_device,
            scores=scores, progress=say)
        say("writing the validation bundle")
        if not (out_dir / BUNDLE_NAME).exists():
            written.append(out_dir / BUNDLE_NAME)
        validation_bundle = finish_bundle(partial, final, profile.path, {
            "model": stem, "quant": quant, "profile": profile.name, "eval_text": evaluation.name,
            "host_validation": report.to_dict(),
        })
    export = {
        "model": str(model_path), "profile": profile.name if profile else None, "quant": quant, "gguf": final.name,
        "bundle": validation_bundle.directory.name if validation_bundle else None,
        "plan": plan.to_dict() if plan else None,
        "imatrix": {"used": imatrix is not None, "text": prepared.calib.name, "entries": len(imatrix or {})},
        "fallbacks": [asdict(f) for f in quantized.fallbacks] if quantized else [],
        "pruning": prune_details, "seconds": timings, "resources": asdict(prepared.resources),
        "mixed": asdict(mix) if mix else None,
    }
    report_path = out_dir / REPORT_NAME
    document = write_report(report_path, report, export=export)
    say("writing the report pages")
    write_report_pages(document, out_dir)
    shutil.rmtree(out_dir / RECOVERY_DIR, ignore_errors=True)  # done: nothing left to resume
    return ExportResult(final, reference, report_path, report, quantized, plan, timings,
                        validation_bundle.directory if validation_bundle else None, prepared.resources)


class Distillation:
    """Recovery by distillation after each pruning step (edgeprune.build.pruning.distill): the teacher, the unpruned
    model, is run once over the recovery text's windows before pruning, its outputs cached under the output
    directory with the checkpoints an interrupted run resumes from (a build caches them once for its targets)."""

    def __init__(self, prepared: Prepared, options, teacher, out_dir: Path, say: Progress):
        from edgeprune.build.pruning.distill import TeacherCache, windows
        from edgeprune.core.texts import recovery_texts

        self.options, self.say, self.results = options, say, []
        self.directory = out_dir / RECOVERY_DIR
        texts = ([read_text_file(prepared.options.recovery_text, "recovery")] if prepared.options.recovery_text
                 else recovery_texts())
        self.text = " + ".join(t.name for t in texts)
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


def output_stem(model_path: str | Path) -> str:
    """Name outputs after the input: SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct."""
    path = Path(model_path)
    stem = path.name if path.is_dir() else path.stem
    base, _, suffix = stem.rpartition(".")
    if base and suffix.upper() in QUANT_TYPES:
        stem = base
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in stem).strip("-.")
    return cleaned or "model"
