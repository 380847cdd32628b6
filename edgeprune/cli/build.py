"""`edgeprune init` (an example build file) and `edgeprune build` (every target of a build file)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from edgeprune.cli.options import require_build_install
from edgeprune.core.console import EXIT_BUDGET_MISSED, EXIT_USER_ERROR, progress


@click.command()
@click.argument("path", type=click.Path(path_type=Path), default="edgeprune.toml")
def init(path: Path) -> None:
    """Write a commented example build file (default edgeprune.toml) for `edgeprune build`."""
    from edgeprune.build.builds.buildfile import init_build_file

    click.echo(f"wrote {init_build_file(path)}: edit the model and targets, then run edgeprune build {path}")


@click.command()
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
