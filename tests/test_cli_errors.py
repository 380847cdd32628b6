"""Bad input through the real CLI process: one line on stderr, exit 2, and no file left in the output directory."""

from __future__ import annotations

import json

import pytest

from conftest import assert_clean_failure, run_cli
from conftest import run_export as export

PROFILE_OK = "x86-laptop-16gb"


def test_missing_model_path(tmp_path):
    r = export(tmp_path / "nope", tmp_path / "out")
    assert_clean_failure(r, tmp_path / "out", "does not exist")


def test_non_llama_config(tiny_bpe_llama, tmp_path):
    config = json.loads((tiny_bpe_llama / "config.json").read_text())
    config["model_type"], config["architectures"] = "mistral", ["MistralForCausalLM"]
    (tiny_bpe_llama / "config.json").write_text(json.dumps(config))
    r = export(tiny_bpe_llama, tmp_path / "out")
    assert_clean_failure(r, tmp_path / "out", "'mistral' model")


def test_truncated_safetensors(tiny_bpe_llama, tmp_path):
    weights = tiny_bpe_llama / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    r = export(tiny_bpe_llama, tmp_path / "out")
    assert_clean_failure(r, tmp_path / "out", "truncated")


def test_pickle_only_weights_are_refused(tiny_bpe_llama, tmp_path):
    (tiny_bpe_llama / "model.safetensors").unlink()
    (tiny_bpe_llama / "pytorch_model.bin").write_bytes(b"not really a pickle")
    r = export(tiny_bpe_llama, tmp_path / "out")
    assert_clean_failure(r, tmp_path / "out", "--allow-pickle")


def test_missing_tokenizer(tiny_bpe_llama, tmp_path):
    (tiny_bpe_llama / "tokenizer.json").unlink()
    r = export(tiny_bpe_llama, tmp_path / "out")
    assert_clean_failure(r, tmp_path / "out", "no tokenizer")


def test_truncated_gguf(smollm2_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as f:
        cut.write_bytes(f.read(5_000_000))
    r = export(cut, tmp_path / "out")
    assert_clean_failure(r, tmp_path / "out", "truncated")


def test_unknown_quant_type(tiny_bpe_llama, tmp_path):
    r = export(tiny_bpe_llama, tmp_path / "out", "--quant", "Q4_K_X")
    assert_clean_failure(r, tmp_path / "out", "unknown quant type")


def test_unknown_profile(tiny_bpe_llama, tmp_path):
    r = export(tiny_bpe_llama, tmp_path / "out", profile="raspberry-pi-9")
    assert_clean_failure(r, tmp_path / "out", "unknown profile")


def test_profile_with_missing_field(tiny_bpe_llama, tmp_path):
    from edgeprune.profiles import load_profile

    text = load_profile(PROFILE_OK).path.read_text()
    broken = tmp_path / "broken.toml"
    broken.write_text("\n".join(l for l in text.splitlines() if not l.startswith("memory_bandwidth_gbs")))
    r = export(tiny_bpe_llama, tmp_path / "out", profile=str(broken))
    assert_clean_failure(r, tmp_path / "out", "memory_bandwidth_gbs")


def test_output_directory_not_writable(tiny_bpe_llama, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output directory should go")
    r = export(tiny_bpe_llama, blocker / "out")
    assert_clean_failure(r, blocker.with_name("out"), "output directory")
    assert blocker.read_text() == "a file where the output directory should go"


@pytest.mark.parametrize("content, expected", [(b"", "empty"), (b"\xff\xfe\x00bad", "not UTF-8")])
def test_bad_calibration_text(tiny_bpe_llama, tmp_path, content, expected):
    calib = tmp_path / "calib.txt"
    calib.write_bytes(content)
    r = export(tiny_bpe_llama, tmp_path / "out", "--calib", str(calib))
    assert_clean_failure(r, tmp_path / "out", expected)


def test_validate_rejects_a_non_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("hello")
    r = run_cli("validate", str(fake))
    assert_clean_failure(r, tmp_path / "none", "not a GGUF")


def test_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0
    for command in ("export", "validate", "profiles"):
        assert command in r.stdout
