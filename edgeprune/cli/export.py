"""`edgeprune export` (a GGUF for a device profile, validated) and `edgeprune prune` (a pruned GGUF only)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edgeprune.cli.options import (evaluation_precision, given_flags, profile_option, pruning_options,
                                   recovery_minutes_option, recovery_options, refuse_unused, require_build_install,
                                   scale_options, search_option, text_options)
from edgeprune.core.console import EXIT_BUDGET_MISSED, progress
from edgeprune.core.errors import EdgepruneError


@click.command()
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
           method, allocation, distill_steps, distill_rank, prune_steps, recovery_text, recovery_minutes, eval_path,
           threads, eval_chunks, eval_precision, eval_fixed, eval_ctx, host_profile, on_device, calib_sequences,
           streaming, device):
    """Export MODEL (a Hugging Face Llama directory or a llama GGUF) for a device profile.

    The profile decides: the planner picks the quant type and the pruning that meet its budgets with the least
    estimated quality loss (see `edgeprune plan`). --quant narrows the planner to one type; pruning flags
    replace its pruning. Writes DIR/<model>-<QUANT>.gguf, the unpruned F16 reference DIR/reference-F16.gguf and
    DIR/report.json, and prints the validation summary. Exits 1 when the model misses a budget of the profile.
    """
    require_build_install("export")
    from edgeprune.build.export_options import check_recovery_text, prune_options, with_recovery, with_scale
    from edgeprune.build.pipeline.options import ExportOptions
    from edgeprune.build.pipeline.export import export_model

    if mix and no_imatrix:
        raise EdgepruneError("--mix weighs each tensor's error by the importance matrix: drop --no-imatrix")
    profile = profile_option(profile_name, recovery_minutes)
    prune = prune_options(quant or profile.runtime.default_quant, heads, ffn, layers, method, allocation)
    if prune is not None:
        planner_off = "pruning flags (--heads, --ffn, --layers, --method, --allocation) replace the planner's pruning"
        refuse_unused(given_flags(), "export with pruning flags", {
            "recovery_minutes": f"it is the planner's recovery budget, and {planner_off} (recover with "
                                "--distill-steps)",
            **({"search": f"it ranks the planner's candidates, and {planner_off}"} if search == "measured" else {})})
    check_recovery_text(recovery_text, distill_steps, prune, profile)
    options = ExportOptions(quant=quant, calib=calib, eval=eval_path, imatrix=not no_imatrix, eval_ctx=eval_ctx,
                            eval_chunks=eval_chunks, eval_precision=evaluation_precision(eval_precision, eval_fixed),
                            threads=threads, allow_pickle=allow_pickle,
                            host_profile=profile_option(host_profile) if host_profile else None, on_device=on_device,
                            prune=prune, search=search, mix=mix)
    options = with_recovery(with_scale(options, calib_sequences, streaming, device), distill_steps, prune_steps,
                            recovery_text, distill_rank)
    result = export_model(model, profile, out_dir, options, progress)
    click.echo(result.summary)
    click.echo(f"wrote {result.gguf}, {result.report_path} and the validation bundle {result.bundle} "
               f"(on the device: edgeprune validate {result.bundle.name}/)")
    if result.report.passed is False:
        sys.exit(EXIT_BUDGET_MISSED)


@click.command()
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
    from edgeprune.build.export_options import prune_options, with_scale
    from edgeprune.build.pipeline.options import ExportOptions
    from edgeprune.build.pipeline.export import export_model

    options = prune_options(quant, heads, ffn, layers, method, allocation)
    if options is None:
        raise EdgepruneError("nothing to prune: give at least one of --heads, --ffn or --layers")
    export_options = ExportOptions(quant=quant, calib=calib, allow_pickle=allow_pickle, prune=options)
    result = export_model(model, None, out_dir, with_scale(export_options, calib_sequences, streaming, device),
                          progress)
    details = json.loads(result.report_path.read_text())["export"]["pruning"]
    click.echo(f"wrote {result.gguf} ({details['architecture']}, {details['removed_params'] / 1e6:.1f} M parameters "
               f"removed of {details['decoder_params_before'] / 1e6:.1f} M in the decoder)")
