"""`edgeprune validate`: a GGUF measured here, a validation bundle run as on the device, or a bundle run on an
SSH host (--remote); with --update-profile, the profile with the efficiencies measured on the device."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edgeprune.cli.options import evaluation_precision, given_flags, profile_option, refuse_unused, text_options
from edgeprune.core.console import EXIT_BUDGET_MISSED, progress
from edgeprune.core.errors import EdgepruneError


@click.command()
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
             remote_dir, remote_timeout, eval_path, threads, eval_chunks, eval_precision, eval_fixed, eval_ctx,
             host_profile, on_device):
    """Measure GGUF with llama.cpp, run with the profile's runtime (context length, KV cache type, flash attention,
    threads): perplexity, KL divergence, speed and memory, judged against the profile's budgets. Quality is scored
    with flash attention only where a quantized KV cache needs it: elsewhere it changes speed, not the file's quality.

    Given the BUNDLE directory an export wrote, it validates on this machine as the device: the bundle's GGUF
    against the bundle's profile (or --profile), KL divergence from the reference's stored top-k log-probs, speed
    judged as measured; neither the reference GGUF nor torch is needed. The report goes to --json, else into
    BUNDLE/report.json."""
    from edgeprune.core.texts import evaluation_text
    from edgeprune.device.bundle import is_bundle
    from edgeprune.device.profile_update import check_update_destination
    from edgeprune.device.validation.quality import check_evaluation_options
    from edgeprune.device.validation.report import format_summary, write_report
    from edgeprune.device.validation.entry import validate_gguf

    given = given_flags()
    precision = evaluation_precision(eval_precision, eval_fixed)
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
                         json_path, profile_name, eval_chunks if "eval_chunks" in given else None, precision,
                         updated_profile)
        return
    refuse_unused(given, "validate without --remote", {name: "it is for validate BUNDLE --remote user@host" for name in
                                                       ("identity", "known_hosts", "remote_command", "remote_dir",
                                                        "remote_timeout")})
    if is_bundle(gguf):
        refuse_unused(given, "validate BUNDLE", bundle_reasons)
        _validate_bundle(gguf, profile_name, json_path, updated_profile, threads, host_profile,
                         eval_chunks if "eval_chunks" in given else None, precision)
        return
    profile = profile_option(profile_name) if profile_name else None
    if updated_profile is not None:
        if profile is None or not on_device:
            raise EdgepruneError("--update-profile needs --profile (the profile to start from) and --on-device (only "
                                 "a run on the device itself measures the device's efficiencies)")
        check_update_destination(updated_profile)
    if on_device and profile is None:
        raise EdgepruneError("--on-device needs --profile: it judges the profile's speed budgets as measured here, "
                             "and without a profile no budget is judged")
    check_evaluation_options(eval_ctx, eval_chunks, precision)
    evaluation = evaluation_text(eval_path)
    host = profile_option(host_profile) if host_profile else None
    report = validate_gguf(gguf, reference_gguf=reference, eval_text=evaluation, n_ctx=eval_ctx,
                           max_chunks=eval_chunks, precision=precision, threads=threads, profile=profile,
                           host_profile=host, on_device=on_device, progress=progress)
    click.echo(format_summary(report))
    if json_path:
        _echo_written(write_report(json_path, report), json_path)
    if updated_profile is not None:
        _write_back(profile, gguf, report, updated_profile)
    if report.passed is False:
        sys.exit(EXIT_BUDGET_MISSED)


def _validate_remote(bundle: Path, remote: str, identity, known_hosts, remote_command: str, remote_dir: str | None,
                     timeout_s: float, threads: int | None, json_path: Path | None, profile_name: str | None,
                     eval_chunks: int | None, precision: float | None, updated_profile: Path | None) -> None:
    """`validate BUNDLE --remote`: the validation runs on the SSH host; its report and exit status come back."""
    from edgeprune.core.atomic import write_text_atomic
    from edgeprune.device.remote import validate_bundle_remote
    from edgeprune.device.validation.results import ValidationReport
    from edgeprune.device.validation.report import format_summary

    target, document, code = validate_bundle_remote(
        bundle, remote, profile=profile_name, eval_chunks=eval_chunks, precision=precision,
        update_profile=updated_profile, identity=identity, known_hosts=known_hosts, remote_command=remote_command,
        remote_dir=remote_dir, threads=threads, timeout_s=timeout_s, progress=progress)
    click.echo(format_summary(ValidationReport.from_dict(document["validation"])))
    report_path = json_path or bundle / f"report-{target.host}.json"
    write_text_atomic(report_path, json.dumps(document, indent=2) + "\n")
    _echo_written(document, report_path)
    if updated_profile is not None:
        click.echo(f"wrote {updated_profile} (the profile with the efficiencies measured on {target})")
    sys.exit(code)


def _validate_bundle(directory: Path, profile_name: str | None, json_path: Path | None, updated_profile: Path | None,
                     threads: int | None, host_profile: Path | None, eval_chunks: int | None,
                     precision: float | None) -> None:
    """`validate BUNDLE`: on this machine as the device."""
    from edgeprune.device.bundle_validation import validate_bundle, write_bundle_report
    from edgeprune.device.profile_writing import check_user_profile_path
    from edgeprune.device.validation.report import format_summary

    if updated_profile is not None:
        check_user_profile_path(updated_profile)
    report_path = json_path or directory / "report.json"
    result = validate_bundle(directory, profile_name, eval_chunks=eval_chunks, precision=precision, threads=threads,
                             host_profile=host_profile, progress=progress)
    click.echo(format_summary(result.report))
    _echo_written(write_bundle_report(result, report_path), report_path)
    if updated_profile is not None:
        _write_back(result.profile, result.bundle.model, result.report, updated_profile)
    if result.report.passed is False:
        sys.exit(EXIT_BUDGET_MISSED)


def _echo_written(document: dict, report_path: Path) -> None:
    """The report's pages beside its JSON, and one line naming every file of it."""
    from edgeprune.build import plots  # matplotlib where installed; it imports no torch, so a device install runs it
    from edgeprune.device.report_pages import write_pages

    click.echo("wrote " + ", ".join(str(p) for p in write_pages(document, report_path, plots)))


def _write_back(profile, gguf: Path, report, destination: Path) -> None:
    from edgeprune.device.profile_update import write_back_efficiency

    device = write_back_efficiency(profile, gguf, report, destination)
    tables = " and the per-type tables" if device.decode_type_efficiency or device.prefill_type_efficiency else ""
    click.echo(f"wrote {destination} ({profile.name} measured here): decode_efficiency {device.decode_efficiency:.4f}, "
               f"prefill_efficiency {device.prefill_efficiency:.4f}{tables}")
