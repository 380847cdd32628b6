"""Device profiles: the shipped files load, round-trip, and every kind of mistake fails as one clear line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgeprune.core.errors import EdgepruneError
from edgeprune.device.profile_writing import profile_to_toml, update_efficiency
from edgeprune.device.profiles import (
    KNOWN_QUANT_TYPES, Budgets, DeviceSpec, Profile, RuntimeSpec, list_profiles, load_profile,
)

SHIPPED = {
    "raspberry-pi-5-8gb", "raspberry-pi-4-4gb", "jetson-orin-nano-8gb", "apple-m1-8gb", "snapdragon-8-gen-3-phone",
    "x86-laptop-16gb",
}

VALID = """\
# Test device. Source: made up for the test.
[device]
name = "Test board"                # what the report calls it
memory_bandwidth_gbs = 17          # an integer where a float is expected is fine
compute_gflops = 60.0
threads = 4
decode_efficiency = 0.6            # literature default
prefill_efficiency = 1

[runtime]
allow_deci = true
quant_types = ["Q8_0", "Q4_K_M", "Q4_0"]
default_quant = "Q4_K_M"
kv_cache_type = "f16"
flash_attention = false

[budgets]
memory_mib = 200
context_length = 2048
min_decode_tps = 25.0
max_ttft_s = 2.0
ttft_prompt_tokens = 128
max_file_mib = 120
"""


def write(tmp_path: Path, text: str, name: str = "board.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def edited(old: str, new: str) -> str:
    assert VALID.count(old) == 1, old
    return VALID.replace(old, new)


def one_line_error(path_or_name, *needles: str) -> str:
    with pytest.raises(EdgepruneError) as info:
        load_profile(path_or_name)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def test_valid_file_loads_with_python_types(tmp_path):
    path = write(tmp_path, VALID)
    profile = load_profile(path)
    assert profile == Profile(
        name="board", path=path,
        device=DeviceSpec("Test board", 17.0, 60.0, 4, 0.6, 1.0),
        runtime=RuntimeSpec(True, ("Q8_0", "Q4_K_M", "Q4_0"), "Q4_K_M", "f16", False),
        budgets=Budgets(200.0, 2048, 25.0, 2.0, 128, 120.0),
    )
    assert type(profile.device.memory_bandwidth_gbs) is float and type(profile.device.threads) is int
    assert load_profile(str(path)) == profile


def test_max_file_mib_is_optional(tmp_path):
    assert load_profile(write(tmp_path, edited("max_file_mib = 120\n", ""))).budgets.max_file_mib is None


def test_every_shipped_profile_loads():
    profiles = list_profiles()
    assert {p.name for p in profiles} >= SHIPPED
    assert [p.name for p in profiles] == sorted(p.name for p in profiles)
    for profile in profiles:
        assert profile.path.name == f"{profile.name}.toml"
        assert load_profile(profile.name) == profile
        assert set(profile.runtime.quant_types) <= set(KNOWN_QUANT_TYPES)


def test_shipped_profiles_cite_their_sources():
    for profile in list_profiles():
        head = profile.path.read_text(encoding="utf-8").split("[device]")[0]
        assert "Source" in head and head.startswith("#"), profile.path


def test_budgets_bind_somewhere_and_not_everywhere():
    """SmolLM2-135M at Q4_K_M is ~100 MiB of weights: some profiles must force pruning, others must not."""
    budgets = {p.name: p.budgets for p in list_profiles()}
    assert budgets["raspberry-pi-4-4gb"].memory_mib <= 256
    assert budgets["snapdragon-8-gen-3-phone"].max_file_mib < 100
    assert budgets["x86-laptop-16gb"].memory_mib >= 1024 and budgets["x86-laptop-16gb"].max_file_mib is None


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_profile_round_trips(tmp_path, name):
    profile = load_profile(name)
    again = load_profile(write(tmp_path, profile_to_toml(profile), f"{name}.toml"))
    assert (again.name, again.device, again.runtime, again.budgets) == (
        profile.name, profile.device, profile.runtime, profile.budgets)


def test_round_trip_of_awkward_values(tmp_path):
    text = edited('name = "Test board"', 'name = "Board \\"β\\" \\\\ 2\\t\\u007f"').replace("max_file_mib = 120\n", "")
    text = text.replace("compute_gflops = 60.0", "compute_gflops = 1e16")
    profile = load_profile(write(tmp_path, text))
    assert profile.device.name == 'Board "β" \\ 2\t\x7f'
    again = load_profile(write(tmp_path, profile_to_toml(profile), "again.toml"))
    assert (again.device, again.runtime, again.budgets) == (profile.device, profile.runtime, profile.budgets)


def test_unknown_profile_name_lists_the_shipped_ones():
    message = one_line_error("raspberry-pi-9", "raspberry-pi-9")
    assert all(name in message for name in SHIPPED)


def test_missing_file(tmp_path):
    one_line_error(tmp_path / "absent.toml", "absent.toml", "not found")
    one_line_error(str(tmp_path / "absent.toml"), "absent.toml", "not found")


def test_directory_instead_of_file(tmp_path):
    folder = tmp_path / "dir.toml"
    folder.mkdir()
    one_line_error(folder, "dir.toml")


def test_not_utf8(tmp_path):
    path = tmp_path / "board.toml"
    path.write_bytes(VALID.replace("Test board", "Test b\xf6ard").encode("latin-1"))
    one_line_error(path, "board.toml", "UTF-8")


BAD_INPUTS = {
    "syntax: unit outside quotes": (edited("memory_mib = 200", "memory_mib = 3 GB"), ["memory_mib = 3 GB", "line 18"]),
    "syntax: unclosed string": (edited('kv_cache_type = "f16"', 'kv_cache_type = "f16'), ["kv_cache_type", "TOML"]),
    "missing section": (VALID[:VALID.index("[budgets]")], ["missing section [budgets]"]),
    "missing field": (edited("threads = 4\n", ""), ["[device]", "threads", "threads = 4"]),
    "unknown field (typo)": (edited("memory_mib = 200", "memroy_mib = 200"), ["memroy_mib", "did you mean memory_mib"]),
    "unknown section": (edited("[runtime]", "[extra]\nx = 1\n\n[runtime]"), ["unknown section [extra]"]),
    "misspelt section": (edited("[runtime]", "[runtmie]"), ["[runtmie]", "did you mean runtime"]),
    "field above every section": ("threads = 4\n" + edited("threads = 4\n", ""), ["threads", "move it under [device]"]),
    "section given as a value": ("budgets = 3\n" + VALID[:VALID.index("[budgets]")], ["budgets", "must be a section"]),
    "units in a string": (
        edited("memory_mib = 200", 'memory_mib = "3 GB"'),
        ["memory_mib", "plain number of MiB", "3 GB"],
    ),
    "quoted number": (
        edited("min_decode_tps = 25.0", 'min_decode_tps = "25"'),
        ["min_decode_tps", "tokens per second"],
    ),
    "bandwidth with unit": (edited("memory_bandwidth_gbs = 17 ", 'memory_bandwidth_gbs = "17 GB/s" '),
                            ["memory_bandwidth_gbs", "plain number of GB/s"]),
    "bool for a number": (edited("max_ttft_s = 2.0", "max_ttft_s = true"), ["max_ttft_s", "seconds"]),
    "list for a number": (edited("compute_gflops = 60.0", "compute_gflops = [60]"), ["compute_gflops", "plain number"]),
    "fractional count": (edited("threads = 4", "threads = 4.5"), ["threads", "whole number"]),
    "count with units": (
        edited("context_length = 2048", 'context_length = "2k"'),
        ["context_length", "whole number of tokens"],
    ),
    "zero memory": (edited("memory_mib = 200", "memory_mib = 0"), ["memory_mib", "above zero"]),
    "negative bandwidth": (
        edited("memory_bandwidth_gbs = 17 ", "memory_bandwidth_gbs = -17 "),
        ["memory_bandwidth_gbs", "above zero"],
    ),
    "infinite compute": (edited("compute_gflops = 60.0", "compute_gflops = inf"), ["compute_gflops", "finite"]),
    "nan budget": (edited("min_decode_tps = 25.0", "min_decode_tps = nan"), ["min_decode_tps", "finite"]),
    "zero threads": (edited("threads = 4", "threads = 0"), ["threads", "at least 1"]),
    "negative context": (edited("context_length = 2048", "context_length = -1"), ["context_length", "at least 1"]),
    "zero file budget": (edited("max_file_mib = 120", "max_file_mib = 0"), ["max_file_mib", "above zero"]),
    "zero efficiency": (edited("decode_efficiency = 0.6", "decode_efficiency = 0"), ["decode_efficiency", "(0, 1]"]),
    "efficiency above one": (
        edited("prefill_efficiency = 1", "prefill_efficiency = 1.01"),
        ["prefill_efficiency", "(0, 1]"],
    ),
    "efficiency in percent": (
        edited("decode_efficiency = 0.6", "decode_efficiency = 60"),
        ["decode_efficiency", "60%"],
    ),
    "efficiency as text": (
        edited("decode_efficiency = 0.6", 'decode_efficiency = "60%"'),
        ["decode_efficiency", "(0, 1]"],
    ),
    "bool as text": (edited("allow_deci = true", 'allow_deci = "yes"'), ["allow_deci", "true or false"]),
    "bool as number": (edited("flash_attention = false", "flash_attention = 0"), ["flash_attention", "true or false"]),
    "empty name": (edited('name = "Test board"', 'name = ""'), ["name", "text"]),
    "multi-line name": (edited('name = "Test board"', 'name = "Test\\nboard"'), ["name", "one line"]),
    "name with a carriage return": (edited('name = "Test board"', 'name = "Test\\rboard"'), ["name", "one line"]),
    "unknown kv cache type": (
        edited('kv_cache_type = "f16"', 'kv_cache_type = "q4_0"'),
        ["kv_cache_type", "f16, q8_0, f32"],
    ),
    "quantized kv without flash attention": (edited('kv_cache_type = "f16"', 'kv_cache_type = "q8_0"'),
                                             ["kv_cache_type", "flash_attention"]),
    "default quant not allowed": (
        edited('default_quant = "Q4_K_M"', 'default_quant = "Q6_K"'),
        ["default_quant", "quant_types"],
    ),
    "default quant unknown": (
        edited('default_quant = "Q4_K_M"', 'default_quant = "Q4_K_X"'),
        ["default_quant", "Q4_K_X"],
    ),
    "quant type unknown": (edited('"Q4_0"]', '"Q4_K_XL"]'), ["quant_types", "Q4_K_XL"]),
    "quant type lower case": (edited('"Q4_0"]', '"q4_0"]'), ["quant_types", "did you mean Q4_0"]),
    "quant types not a list": (
        edited('quant_types = ["Q8_0", "Q4_K_M", "Q4_0"]', 'quant_types = "Q4_K_M"'),
        ["quant_types", "list"],
    ),
    "quant types empty": (
        edited('quant_types = ["Q8_0", "Q4_K_M", "Q4_0"]', "quant_types = []"),
        ["quant_types", "non-empty"],
    ),
    "quant type twice": (edited('"Q4_0"]', '"Q4_0", "Q8_0"]'), ["quant_types", "twice"]),
    "quant type not text": (edited('"Q4_0"]', "4]"), ["quant_types", "not a llama.cpp quant type"]),
    "unknown tensor type": (
        edited("prefill_efficiency = 1\n", "prefill_efficiency = 1\ndecode_type_efficiency = { q4_x = 0.5 }\n"),
        ["decode_type_efficiency", "'q4_x'", "GGUF tensor type"],
    ),
    "tensor type efficiency out of range": (
        edited("prefill_efficiency = 1\n", "prefill_efficiency = 1\nprefill_type_efficiency = { q8_0 = 0 }\n"),
        ["prefill_type_efficiency", "q8_0", "(0, 4]"],
    ),
    "tensor type efficiencies not a table": (
        edited("prefill_efficiency = 1\n", "prefill_efficiency = 1\ndecode_type_efficiency = 0.5\n"),
        ["decode_type_efficiency", "inline table"],
    ),
    "prompt longer than context": (edited("ttft_prompt_tokens = 128", "ttft_prompt_tokens = 4096"),
                                   ["ttft_prompt_tokens", "context_length"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_naming_file_and_field(tmp_path, case):
    text, needles = BAD_INPUTS[case]
    one_line_error(write(tmp_path, text), "board.toml", *needles)


def test_known_quant_types_are_llama_cpp_names():
    assert len(set(KNOWN_QUANT_TYPES)) == len(KNOWN_QUANT_TYPES) == 32
    assert {"F16", "Q8_0", "Q4_K_M", "Q4_0", "IQ4_NL", "TQ2_0"} <= set(KNOWN_QUANT_TYPES)


def test_update_efficiency_changes_only_those_values(tmp_path):
    path = write(tmp_path, VALID)
    profile = update_efficiency(path, decode_efficiency=0.71234)
    before, after = VALID.splitlines(), path.read_text(encoding="utf-8").splitlines()
    changed = [(old, new) for old, new in zip(before, after) if old != new]
    assert len(before) == len(after)
    assert changed == [("decode_efficiency = 0.6            # literature default",
                        "decode_efficiency = 0.71234            # literature default")]
    assert profile == load_profile(path)
    assert profile.device.decode_efficiency == 0.71234 and profile.device.prefill_efficiency == 1.0
    assert os.listdir(tmp_path) == ["board.toml"]  # no partial file left behind


def test_update_efficiency_both_values_keeps_crlf(tmp_path):
    path = tmp_path / "board.toml"
    path.write_bytes(VALID.replace("\n", "\r\n").encode())
    update_efficiency(path, decode_efficiency=0.55, prefill_efficiency=1)
    raw = path.read_bytes().decode()
    expected = VALID.replace("decode_efficiency = 0.6 ", "decode_efficiency = 0.55 ").replace(
        "prefill_efficiency = 1\n", "prefill_efficiency = 1.0\n")
    assert raw == expected.replace("\n", "\r\n")
    device = load_profile(path).device
    assert (device.decode_efficiency, device.prefill_efficiency) == (0.55, 1.0)


def test_update_efficiency_leaves_commented_out_lines(tmp_path):
    """Only the live [device] line moves, not an old value kept in a comment."""
    text = edited("[runtime]\n", "[runtime]\n# decode_efficiency = 0.9 was tried\n")
    path = write(tmp_path, text)
    update_efficiency(path, prefill_efficiency=0.25)
    assert path.read_text(encoding="utf-8") == text.replace("prefill_efficiency = 1", "prefill_efficiency = 0.25")


@pytest.mark.parametrize("value", [0, 1.5, -0.2, float("nan")])
def test_update_efficiency_rejects_bad_values_and_leaves_file(tmp_path, value):
    path = write(tmp_path, VALID)
    with pytest.raises(EdgepruneError) as info:
        update_efficiency(path, decode_efficiency=value)
    assert "\n" not in str(info.value) and "board.toml" in str(info.value) and "decode_efficiency" in str(info.value)
    assert path.read_text(encoding="utf-8") == VALID


@pytest.mark.parametrize("old, new", [
    ("decode_efficiency = 0.6 ", '"decode_efficiency" = 0.6 '),  # quoted key
    ("[device]", '[ "device" ]'),  # quoted header
])
def test_update_efficiency_needs_a_plain_line(tmp_path, old, new):
    """A valid profile whose line the rewriter cannot recognise fails clearly rather than writing elsewhere."""
    text = edited(old, new)
    path = write(tmp_path, text)
    assert load_profile(path).device.decode_efficiency == 0.6
    with pytest.raises(EdgepruneError) as info:
        update_efficiency(path, decode_efficiency=0.5)
    assert "\n" not in str(info.value) and "board.toml" in str(info.value) and "decode_efficiency" in str(info.value)
    assert path.read_text(encoding="utf-8") == text


def test_update_efficiency_refuses_an_invalid_file(tmp_path):
    text = edited("memory_mib = 200", 'memory_mib = "200 MiB"')
    path = write(tmp_path, text)
    with pytest.raises(EdgepruneError, match="memory_mib"):
        update_efficiency(path, decode_efficiency=0.5)
    assert path.read_text(encoding="utf-8") == text


def test_measured_type_efficiencies_round_trip_and_default_to_absent(tmp_path):
    assert load_profile(write(tmp_path, VALID)).device.decode_type_efficiency is None
    text = edited("prefill_efficiency = 1\n",
                  "prefill_efficiency = 1\ndecode_type_efficiency = { q8_0 = 0.9, q4_k = 1.25 }\n")
    profile = load_profile(write(tmp_path, text))
    assert profile.device.decode_type_efficiency == {"q8_0": 0.9, "q4_k": 1.25}
    again = load_profile(write(tmp_path, profile_to_toml(profile), "again.toml"))
    assert again.device == profile.device


def test_update_efficiency_rewrites_a_type_table_and_its_comment_stays(tmp_path):
    text = edited("prefill_efficiency = 1\n", "prefill_efficiency = 1\n"
                  "decode_type_efficiency = { q8_0 = 0.9, q4_k = 1.25 }  # measured\ndecode_layer_overhead_us = 150\n")
    path = write(tmp_path, text)
    profile = update_efficiency(path, decode_type_efficiency={"q8_0": 0.5, "q4_k": 2.5})
    assert profile.device.decode_type_efficiency == {"q8_0": 0.5, "q4_k": 2.5}
    assert profile.device.decode_layer_overhead_us == 150.0
    assert "  # measured\n" in path.read_text(encoding="utf-8")
    with pytest.raises(EdgepruneError, match="prefill_type_efficiency"):  # absent from the file: nowhere to write
        update_efficiency(path, prefill_type_efficiency={"q8_0": 0.5})


def test_layer_overhead_must_be_a_positive_number(tmp_path):
    path = write(tmp_path, edited("prefill_efficiency = 1\n", "prefill_efficiency = 1\ndecode_layer_overhead_us = -3\n"))
    with pytest.raises(EdgepruneError, match=r"decode_layer_overhead_us.*microseconds per layer per token"):
        load_profile(path)


def test_recovery_minutes_is_an_optional_positive_budget(tmp_path):
    assert load_profile(write(tmp_path, VALID)).budgets.recovery_minutes is None
    path = write(tmp_path, edited("max_file_mib = 120\n", "max_file_mib = 120\nrecovery_minutes = 15\n"))
    assert load_profile(path).budgets.recovery_minutes == 15.0
    path = write(tmp_path, edited("max_file_mib = 120\n", "max_file_mib = 120\nrecovery_minutes = 0\n"))
    with pytest.raises(EdgepruneError, match=r"recovery_minutes = 0 must be a finite number of minutes above zero"):
        load_profile(path)
