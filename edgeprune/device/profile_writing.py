"""Device profiles written: a profile as TOML, a build target's overrides applied to one, and calibrated
efficiencies written into a user's profile file with its comments kept. Every profile written here is read back
through edgeprune.device.profiles' schema and checks first, so nothing can be written that would not load."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from edgeprune.core.atomic import write_text_atomic
from edgeprune.core.errors import EdgepruneError
from edgeprune.device.profiles import (PROFILE_SUFFIX, SCHEMA, Profile, check_value, parse_profile, read_profile_text,
                                       shipped_dir, toml_value)

_EFFICIENCY_FIELDS = ("decode_efficiency", "prefill_efficiency", "decode_type_efficiency", "prefill_type_efficiency")
_HEADER = re.compile(r"\s*\[\s*([A-Za-z0-9_-]+)\s*\]")
_ASSIGNMENT = re.compile(r"(?P<lead>\s*(?P<key>[A-Za-z0-9_-]+)\s*=\s*)(?P<value>\{[^}]*\}|[^\s#]+)(?P<rest>.*)", re.DOTALL)


def profile_to_toml(profile: Profile) -> str:
    """The profile as TOML that `load_profile` reads back to equal values (source comments are not kept)."""
    out: list[str] = []
    for section, (_, schema) in SCHEMA.items():
        values = getattr(profile, section)
        out.append(f"[{section}]")
        present = {key: getattr(values, key) for key in schema if getattr(values, key) is not None}
        out.extend(f"{key} = {toml_value(value)}" for key, value in present.items())
        out.append("")
    return "\n".join(out)


def with_overrides(profile: Profile, path: Path, *, context_length: int | None = None,
                   quant_types: tuple[str, ...] | None = None, allow_deci: bool | None = None,
                   recovery_minutes: float | None = None) -> tuple[Profile, str]:
    """The profile with a build target's overrides, as it would read from `path`, and its TOML text: checked by
    the same rules as a profile file, so an override cannot make a profile no file could be."""
    runtime, budgets = profile.runtime, profile.budgets
    if quant_types:
        runtime = dataclasses.replace(runtime, quant_types=tuple(quant_types), default_quant=(
            runtime.default_quant if runtime.default_quant in quant_types else quant_types[0]))
    if allow_deci is not None:
        runtime = dataclasses.replace(runtime, allow_deci=allow_deci)
    if context_length is not None:
        budgets = dataclasses.replace(budgets, context_length=context_length)
    if recovery_minutes is not None:
        budgets = dataclasses.replace(budgets, recovery_minutes=recovery_minutes)
    text = profile_to_toml(dataclasses.replace(profile, runtime=runtime, budgets=budgets))
    return parse_profile(path, text), text


def check_user_profile_path(path: str | Path) -> None:
    """A profile edgeprune writes goes to the user's own file, never over a shipped profile."""
    path = Path(path)
    if path.suffix != PROFILE_SUFFIX:
        raise EdgepruneError(f"{path}: a profile file must end in {PROFILE_SUFFIX}")
    if path.resolve().parent == shipped_dir().resolve():
        raise EdgepruneError(f"{path} is in edgeprune's shipped profiles: write the updated profile to a file of your "
                             "own, e.g. --update-profile my-device.toml")


def update_efficiency(path: str | Path, *, out: str | Path | None = None,
                      **efficiencies: float | dict[str, float] | None) -> Profile:
    """Write calibrated efficiencies (any of decode_efficiency, prefill_efficiency and the two per-type tables)
    into the profile at `path`, or into a copy of it at `out`, leaving its comments and other lines alone."""
    path = Path(path)
    destination = Path(out) if out is not None else path
    check_user_profile_path(destination)
    unknown = set(efficiencies) - set(_EFFICIENCY_FIELDS)
    if unknown:
        raise TypeError(f"not an efficiency field: {', '.join(sorted(unknown))}")
    text = read_profile_text(path)
    parse_profile(path, text)
    checked = {key: check_value(path, "device", key, value, SCHEMA["device"][1][key])
               for key, value in efficiencies.items() if value is not None}
    lines = text.splitlines(keepends=True)
    section = None
    for i, line in enumerate(lines):
        header = _HEADER.match(line)
        if header:
            section = header.group(1)
            continue
        assignment = _ASSIGNMENT.match(line)
        if section == "device" and assignment and assignment["key"] in checked:
            lines[i] = f"{assignment['lead']}{toml_value(checked.pop(assignment['key']))}{assignment['rest']}"
    if checked:
        key = next(iter(checked))
        raise EdgepruneError(f"{path}: cannot update [device] {key}: write it as `{key} = "
                             f"{SCHEMA['device'][1][key].example}` on one line under a [device] header")
    text = "".join(lines)
    profile = parse_profile(destination, text)
    write_text_atomic(destination, text)
    return profile
