"""`edgeprune profiles list|measure|show`: the device profiles, and a profile measured on this machine."""

from __future__ import annotations

from pathlib import Path

import click

from edgeprune.cli.options import profile_option, require_build_install
from edgeprune.core.console import progress


@click.group()
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
    from edgeprune.build.hostprobe import measure_host_profile
    from edgeprune.core.fetch import fetch_smollm2
    from edgeprune.device.profile_update import write_measured_profile

    profile = measure_host_profile(model_path or fetch_smollm2(), threads=threads, progress=progress)
    write_measured_profile(out_path, profile)
    d = profile.device
    click.echo(f"wrote {out_path}: {d.memory_bandwidth_gbs:.1f} GB/s, {d.compute_gflops:.1f} GFLOPS, {d.threads} threads, "
               f"decode efficiency {d.decode_efficiency:.3f}, prefill efficiency {d.prefill_efficiency:.3f}, "
               f"{d.decode_layer_overhead_us or 0:.0f} us per layer per decoded token")


@profiles.command("show")
@click.argument("name")
def profiles_show(name: str) -> None:
    """Print a profile (shipped name or TOML path) as TOML."""
    from edgeprune.device.profile_writing import profile_to_toml

    click.echo(profile_to_toml(profile_option(name)), nl=False)
