"""`edgeprune plan`: the quant type and pruning the planner would choose for a device, and why."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgeprune.cli.options import (given_flags, profile_option, recovery_minutes_option, refuse_unused,
                                   require_build_install, search_option)
from edgeprune.core.atomic import atomic_output, ensure_writable_dir
from edgeprune.core.console import progress
from edgeprune.core.errors import EdgepruneError


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
@click.option("--frontier", is_flag=True, help="Also list the candidates no other beats on size, estimated quality, "
                                               "speed, memory and TTFT together (--json always carries them).")
@click.option("--frontier-plot", type=click.Path(path_type=Path, dir_okay=False),
              help="Also draw the frontier's file size against estimated quality, with the budgets, as this PNG "
                   "(needs matplotlib; implies --frontier).")
@recovery_minutes_option
@search_option
def plan(model, profile_name, quants, as_json, allow_pickle, calib, threads, mix, frontier, frontier_plot,
         recovery_minutes, search):
    """Choose quantization and pruning for MODEL on a device, and explain why. Nothing is built unless
    --search measured builds and scores the best few candidates."""
    require_build_install("plan")
    from edgeprune.build.planner import format_plan
    from edgeprune.build.planning import plan_model

    shown = frontier or frontier_plot is not None
    if search == "measured" and shown:
        flag = "--frontier" if frontier else "--frontier-plot"
        raise EdgepruneError(f"{flag} weighs every candidate on estimated quality, and --search measured measures "
                             f"only its best few: use --search estimated, or drop {flag}")
    if search != "measured":
        refuse_unused(given_flags(), "plan --search estimated", {
            "calib": "the estimated plan reads no text; --search measured scores its candidates on it",
            "threads": "the estimated plan runs no llama.cpp; --search measured does"})
    profile = profile_option(profile_name, recovery_minutes)
    if frontier_plot is not None:
        ensure_writable_dir(frontier_plot.parent)  # before the planning's seconds, not after
    result, name = plan_model(model, profile, quants=quants, mix=mix, search=search, calib=calib, threads=threads,
                              allow_pickle=allow_pickle, progress=progress)
    if frontier_plot is not None:
        write_frontier_plot(result.to_dict(), frontier_plot)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(format_plan(result, name, profile, frontier=shown))


def write_frontier_plot(plan: dict, path: Path) -> None:
    """The frontier's plot as a PNG at `path`: the figure report.html shows."""
    from edgeprune.build.plots import frontier_plot

    figure = frontier_plot([(plan["profile"], plan)])
    if figure is None:
        raise EdgepruneError("--frontier-plot draws with matplotlib, which is not installed: pip install matplotlib")
    with atomic_output(path) as tmp:
        tmp.write_bytes(figure.png)
