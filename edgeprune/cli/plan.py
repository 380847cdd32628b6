"""`edgeprune plan`: the quant type and pruning the planner would choose for a device, and why."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgeprune.cli.options import (given_flags, profile_option, recovery_minutes_option, refuse_unused,
                                   require_build_install, search_option)
from edgeprune.core.console import progress


@click.command()
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
    from edgeprune.build.planner import format_plan
    from edgeprune.build.planning import plan_model

    if search != "measured":
        refuse_unused(given_flags(), "plan --search estimated", {
            "calib": "the estimated plan reads no text; --search measured scores its candidates on it",
            "threads": "the estimated plan runs no llama.cpp; --search measured does"})
    profile = profile_option(profile_name, recovery_minutes)
    result, name = plan_model(model, profile, quants=quants, mix=mix, search=search, calib=calib, threads=threads,
                              allow_pickle=allow_pickle, progress=progress)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(format_plan(result, name, profile))
