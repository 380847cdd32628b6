"""Device profiles: what a target device can do and what the user asks of it, read from TOML files.

A profile is written by hand, so every mistake in one must come back as a single line naming the file,
the field and the fix, before any hour-long pruning run starts on a wrong budget. One schema drives both
validation and writing (edgeprune.device.profile_writing: `profile_to_toml`, `update_efficiency`), so the two
cannot drift apart.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edgeprune.core.errors import EdgepruneError

KNOWN_QUANT_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1", "Q4_K_M", "Q4_K_S", "Q4_0",
    "Q4_1", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "Q2_K_S", "IQ4_XS", "IQ4_NL", "IQ3_M", "IQ3_S", "IQ3_XS",
    "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S", "TQ1_0", "TQ2_0",
)  # llama.cpp ftype names, as llama-quantize spells them
KV_CACHE_TYPES = ("f16", "q8_0", "f32")
SWA_CACHES = ("full", "window")  # llama_context_params.swa_full true / false
DEFAULT_BATCH = 512  # llama.cpp's default n_ubatch
TENSOR_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0", "q3_k", "q2_k",
                "iq4_xs", "iq4_nl", "iq3_s", "iq3_xxs", "iq2_xs", "iq2_xxs", "iq1_s", "tq1_0", "tq2_0")
PROFILE_SUFFIX = ".toml"
MAX_TYPE_EFFICIENCY = 4.0  # per tensor type: caches can beat the streaming benchmark, not by more


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    memory_bandwidth_gbs: float
    compute_gflops: float
    threads: int
    decode_efficiency: float
    prefill_efficiency: float
    # Measured per tensor type (`edgeprune profiles measure`), where a type's kernel is slower than the memory
    # or faster than the matmul benchmark; types absent here, and hand-written profiles, use the two above.
    decode_type_efficiency: dict[str, float] | None = None
    prefill_type_efficiency: dict[str, float] | None = None
    # Time every layer costs a decoded token beyond its bytes (llama.cpp's per-operation thread barriers and
    # graph work): large for small models on shared cores, so measured, never guessed; absent means none.
    decode_layer_overhead_us: float | None = None


@dataclass(frozen=True)
class RuntimeSpec:
    allow_deci: bool
    quant_types: tuple[str, ...]
    default_quant: str
    kv_cache_type: str
    flash_attention: bool
    # llama.cpp's micro-batch (n_ubatch): the compute buffer holds a batch's logits, 512 MiB for Gemma 3's
    # 262,144-token vocabulary at llama.cpp's 512; absent: 512.
    batch_size: int | None = None
    # Sliding-window layers' KV cache (Gemma 3): "full" (llama.cpp's C default, which llama-cpp-python keeps)
    # or "window" (llama-server's default: the window plus a batch); absent: "full".
    swa_cache: str | None = None

    @property
    def micro_batch(self) -> int:
        return self.batch_size or DEFAULT_BATCH

    @property
    def swa_full(self) -> bool:
        return (self.swa_cache or "full") == "full"


@dataclass(frozen=True)
class Budgets:
    memory_mib: float
    context_length: int
    min_decode_tps: float
    max_ttft_s: float
    ttft_prompt_tokens: int
    max_file_mib: float | None
    # Minutes the build host may spend on recovery by distillation (edgeprune.build.pruning.distill); absent: none.
    # With it, the planner may prune deeper and recover.
    recovery_minutes: float | None = None


@dataclass(frozen=True)
class Profile:
    name: str
    path: Path
    device: DeviceSpec
    runtime: RuntimeSpec
    budgets: Budgets


@dataclass(frozen=True)
class _Field:
    """How one TOML value is checked: `kind` picks the check, `unit` and `example` go into the error."""

    kind: str  # number | count | fraction | type_table | bool | text | quants | quant | kv
    example: str
    unit: str = ""
    optional: bool = False


SCHEMA: dict[str, tuple[type, dict[str, _Field]]] = {
    "device": (DeviceSpec, {
        "name": _Field("text", '"Raspberry Pi 5 (8 GB)"'),
        "memory_bandwidth_gbs": _Field("number", "17.0", "GB/s"),
        "compute_gflops": _Field("number", "60.0", "GFLOPS"),
        "threads": _Field("count", "4", "threads"),
        "decode_efficiency": _Field("fraction", "0.6"),
        "prefill_efficiency": _Field("fraction", "0.5"),
        "decode_type_efficiency": _Field("type_table", "{ q8_0 = 0.9, q4_k = 0.6 }", optional=True),
        "prefill_type_efficiency": _Field("type_table", "{ q8_0 = 0.3, q4_k = 0.2 }", optional=True),
        "decode_layer_overhead_us": _Field("number", "150", "microseconds per layer per token", optional=True),
    }),
    "runtime": (RuntimeSpec, {
        "allow_deci": _Field("bool", "true"),
        "quant_types": _Field("quants", '["Q8_0", "Q4_K_M"]'),
        "default_quant": _Field("quant", '"Q4_K_M"'),
        "kv_cache_type": _Field("kv", '"f16"'),
        "flash_attention": _Field("bool", "false"),
        "batch_size": _Field("count", "512", "tokens", optional=True),
        "swa_cache": _Field("swa", '"window"', optional=True),
    }),
    "budgets": (Budgets, {
        "memory_mib": _Field("number", "2048", "MiB"),
        "context_length": _Field("count", "2048", "tokens"),
        "min_decode_tps": _Field("number", "20.0", "tokens per second"),
        "max_ttft_s": _Field("number", "2.0", "seconds"),
        "ttft_prompt_tokens": _Field("count", "128", "tokens"),
        "max_file_mib": _Field("number", "1024", "MiB", optional=True),
        "recovery_minutes": _Field("number", "15", "minutes", optional=True),
    }),
}



def load_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by name ("raspberry-pi-5-8gb"), or any profile file by path."""
    return parse_profile(_resolve(name_or_path))


def list_profiles() -> list[Profile]:
    """Every shipped profile, sorted by name."""
    return [load_profile(name) for name in _shipped_names()]


def shipped_dir() -> Path:
    return Path(str(resources.files("profiles")))


def _shipped_names() -> list[str]:
    return sorted(p.stem for p in shipped_dir().glob(f"*{PROFILE_SUFFIX}"))


def _resolve(name_or_path: str | Path) -> Path:
    """A Path, or a string with a slash or a .toml suffix, is a file; any other string names a shipped profile."""
    text = str(name_or_path)
    available = ", ".join(_shipped_names())
    if isinstance(name_or_path, Path) or "/" in text or "\\" in text or text.endswith(PROFILE_SUFFIX):
        path = Path(name_or_path)
        if not path.is_file():
            raise EdgepruneError(f"profile file {path} not found: give the path of an existing .toml file "
                                 f"or a shipped profile name ({available})")
        return path
    path = shipped_dir() / f"{text}{PROFILE_SUFFIX}"
    if not path.is_file():
        raise EdgepruneError(f"unknown profile {text!r}: shipped profiles are {available}; "
                             f"or give the path of a .toml file")
    return path


def read_profile_text(path: Path) -> str:
    """The file's text with its line endings as they are, so that `update_efficiency` keeps them."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EdgepruneError(f"{path}: not UTF-8 text: save the profile as UTF-8") from exc
    except OSError as exc:
        raise EdgepruneError(f"cannot read profile {path}: {exc.strerror or exc}") from exc


def parse_profile(path: Path, text: str | None = None) -> Profile:
    """Parse and validate one profile: the file's contents, or `text` as if it were in that file."""
    if text is None:
        text = read_profile_text(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise EdgepruneError(f"{path}: not valid TOML: {_syntax_detail(exc, text)}; text needs quotes, "
                             f"numbers need none and carry no units") from exc
    for section, value in data.items():
        owner = next((name for name, (_, schema) in SCHEMA.items() if section in schema), None)
        if owner and not isinstance(value, dict):
            raise EdgepruneError(f"{path}: field {section} sits above the section headers; move it under [{owner}]")
        if section not in SCHEMA:
            raise EdgepruneError(f"{path}: unknown section [{section}]{_did_you_mean(section, SCHEMA)}; "
                                 f"a profile has only [device], [runtime] and [budgets]")
    parts = {section: _parse_section(path, data, section) for section in SCHEMA}
    profile = Profile(name=path.stem, path=path, **parts)
    _check_consistency(profile)
    return profile


def _parse_section(path: Path, data: dict, section: str):
    cls, schema = SCHEMA[section]
    table = data.get(section)
    if table is None:
        raise EdgepruneError(f"{path}: missing section [{section}]; add it with the fields {', '.join(schema)}")
    if not isinstance(table, dict):
        raise EdgepruneError(f"{path}: {section} must be a section: write [{section}] on its own line, "
                             f"then one field per line")
    for key in table:
        if key not in schema:
            raise EdgepruneError(f"{path}: unknown field [{section}] {key}{_did_you_mean(key, schema)}; "
                                 f"the fields of [{section}] are {', '.join(schema)}")
    values = {}
    for key, spec in schema.items():
        if key in table:
            values[key] = check_value(path, section, key, table[key], spec)
        elif spec.optional:
            values[key] = None
        else:
            raise EdgepruneError(f"{path}: [{section}] is missing {key}; add a line like {key} = {spec.example}")
    return cls(**values)


def check_value(path: Path, section: str, key: str, value, spec: _Field):
    """The value converted to its Python type, or an EdgepruneError saying what to write instead."""
    where = f"{path}: [{section}] {key} = {toml_value(value)}"
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec.kind == "number":
        if not is_number:
            raise EdgepruneError(f"{where} must be a plain number of {spec.unit}, without quotes or units, "
                                 f"e.g. {key} = {spec.example}")
        if not math.isfinite(value) or value <= 0:
            raise EdgepruneError(f"{where} must be a finite number of {spec.unit} above zero, "
                                 f"e.g. {key} = {spec.example}")
        return float(value)
    if spec.kind == "count":
        if not isinstance(value, int) or isinstance(value, bool):
            raise EdgepruneError(f"{where} must be a whole number of {spec.unit}, without quotes, units or "
                                 f"decimal point, e.g. {key} = {spec.example}")
        if value <= 0:
            raise EdgepruneError(f"{where} must be at least 1, e.g. {key} = {spec.example}")
        return value
    if spec.kind == "fraction":
        if not is_number or not 0 < value <= 1:
            raise EdgepruneError(f"{where} must be a fraction in (0, 1], e.g. {key} = 0.6 for 60%")
        return float(value)
    if spec.kind == "type_table":
        return _check_type_table(where, key, value, spec)
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise EdgepruneError(f"{where} must be true or false, without quotes, e.g. {key} = {spec.example}")
        return value
    if spec.kind == "quants":
        if not isinstance(value, list) or not value:
            raise EdgepruneError(f"{where} must be a non-empty list of llama.cpp quant type names, "
                                 f"e.g. {key} = {spec.example}")
        names = tuple(_check_quant(where, key, item) for item in value)
        if len(set(names)) != len(names):
            raise EdgepruneError(f"{where} lists a quant type twice; list each once")
        return names
    if spec.kind == "quant":
        return _check_quant(where, key, value)
    if spec.kind == "swa":
        if value not in SWA_CACHES:
            raise EdgepruneError(f"{where} is not a sliding-window cache llama.cpp offers; use \"full\" (a cache "
                                 f"of the whole context) or \"window\" (the window plus a batch)")
        return value
    if spec.kind == "kv":
        if value not in KV_CACHE_TYPES:
            raise EdgepruneError(f"{where} is not a KV cache type llama.cpp offers here; use one of "
                                 f"{', '.join(KV_CACHE_TYPES)} in quotes")
        return value
    if not isinstance(value, str) or not value.strip() or len(value.splitlines()) > 1:
        raise EdgepruneError(f"{where} must be one line of text in quotes, e.g. {key} = {spec.example}")
    return value


def _check_type_table(where: str, key: str, value, spec: _Field) -> dict[str, float]:
    """An inline table from GGUF tensor type names (lower case, as llama.cpp logs them) to efficiencies."""
    if not isinstance(value, dict) or not value:
        raise EdgepruneError(f"{where} must be an inline table of tensor types, e.g. {key} = {spec.example}")
    table = {}
    for name, efficiency in value.items():
        if name not in TENSOR_TYPES:
            raise EdgepruneError(f"{where}: {name!r} is not a GGUF tensor type{_did_you_mean(name.lower(), TENSOR_TYPES)}; "
                                 f"use names like f16, q8_0, q4_k")
        if isinstance(efficiency, bool) or not isinstance(efficiency, (int, float)) or not 0 < efficiency <= MAX_TYPE_EFFICIENCY:
            raise EdgepruneError(f"{where}: the efficiency of {name} must be a number in (0, {MAX_TYPE_EFFICIENCY:g}], "
                                 f"e.g. {name} = 0.8")
        table[name] = float(efficiency)
    return table


def _check_quant(where: str, key: str, name) -> str:
    if isinstance(name, str) and name in KNOWN_QUANT_TYPES:
        return name
    hint = _did_you_mean(name.upper(), KNOWN_QUANT_TYPES) if isinstance(name, str) else ""
    raise EdgepruneError(f"{where}: {toml_value(name)} is not a llama.cpp quant type{hint}; "
                         f"{key} takes names like Q4_K_M, Q8_0, F16 in quotes")


def _check_consistency(profile: Profile) -> None:
    """Rules that tie fields together, each a load failure in llama.cpp or a budget nobody can measure."""
    path, runtime, budgets = profile.path, profile.runtime, profile.budgets
    if runtime.default_quant not in runtime.quant_types:
        raise EdgepruneError(f"{path}: [runtime] default_quant = {toml_value(runtime.default_quant)} is not in "
                             f"quant_types; add it there or pick one of {', '.join(runtime.quant_types)}")
    if runtime.kv_cache_type == "q8_0" and not runtime.flash_attention:
        raise EdgepruneError(f"{path}: [runtime] kv_cache_type = \"q8_0\" needs flash_attention = true "
                             f"(llama.cpp quantizes the V cache only with flash attention); set it or use \"f16\"")
    if budgets.ttft_prompt_tokens > budgets.context_length:
        raise EdgepruneError(f"{path}: [budgets] ttft_prompt_tokens = {budgets.ttft_prompt_tokens} exceeds "
                             f"context_length = {budgets.context_length}; the prompt must fit in the context")


def _syntax_detail(exc: tomllib.TOMLDecodeError, text: str) -> str:
    """tomllib's message plus the offending line, so that the user sees which field is broken."""
    found = re.search(r"at line (\d+)", str(exc))
    lines = text.split("\n")  # TOML counts lines by LF only
    if found and int(found.group(1)) <= len(lines):
        return f"{exc} in `{lines[int(found.group(1)) - 1].strip()}`"
    return str(exc)


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def toml_value(value) -> str:
    """A value as one line of TOML: for writing profiles, and for quoting the user's value back in an error."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")  # TOML forbids a raw DEL
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return str(value)  # TOML dates and times
