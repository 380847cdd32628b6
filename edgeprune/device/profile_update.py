"""Profiles edgeprune writes for the user: a copy of a profile with the efficiencies measured on the device
(`validate --on-device --update-profile`), and a measured machine (`profiles measure`). Never a shipped profile."""

from __future__ import annotations

from pathlib import Path

from edgeprune.core.atomic import ensure_writable_dir, write_text_atomic
from edgeprune.core.shapes import shape_from_gguf
from edgeprune.device.costmodel import calibrated_device, size_of_gguf
from edgeprune.device.gguf_check import read_gguf
from edgeprune.device.profile_writing import check_user_profile_path, profile_to_toml, update_efficiency

MEASURED_HEADER = "# This machine, measured by `edgeprune profiles measure`; budgets are placeholders to edit.\n\n"
EFFICIENCY_FIELDS = ("decode_efficiency", "prefill_efficiency", "decode_type_efficiency", "prefill_type_efficiency")


def check_update_destination(path: Path) -> None:
    """Before any measuring: the updated profile goes to a user's profile file in a directory that takes it."""
    check_user_profile_path(path)
    ensure_writable_dir(path.parent)


def write_back_efficiency(profile, gguf: Path, report, destination: Path):
    """Write `profile` to `destination` with its efficiencies (per-type tables too) scaled so that its prediction
    equals what was just measured on the device (`report`, a ValidationReport of `gguf`); returns the calibrated
    device spec."""
    info = read_gguf(gguf)
    device = calibrated_device(profile.device, size_of_gguf(info), shape_from_gguf(info), report.speed.n_prompt,
                               report.speed.decode_tps, report.speed.prefill_tps)
    update_efficiency(profile.path, out=destination, **{key: getattr(device, key) for key in EFFICIENCY_FIELDS})
    return device


def write_measured_profile(path: Path, profile) -> None:
    """A profile measured on this machine, as TOML under a header saying its budgets are placeholders."""
    write_text_atomic(path, MEASURED_HEADER + profile_to_toml(profile).rstrip("\n") + "\n")
