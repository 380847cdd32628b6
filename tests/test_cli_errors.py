"""Bad input through the real CLI process: one line on stderr, exit 2, and no file left in the output directory.
Flags and texts are checked before the model is loaded: the tests below see no loading line."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

import subprocess

from conftest import CLI_ENV, assert_clean_failure, run_cli
from conftest import run_export as export

PROFILE_OK = "x86-laptop-16gb"


def test_missing_model_path(tmp_path):
    r = export(tmp_path / "nope", tmp_path / "out")
    assert_clean_failure(r, tmp_path / "out", "does not exist")


def test_non_llama_config(tiny_bpe_llama, tmp_path):
    config = json.loads((tiny_bpe_llama / "config.json").read_text())
    config["model_type"], config["architectures"] = "gemma", ["GemmaForCausalLM"]
    (tiny_bpe_llama / "config.json").write_text(json.dumps(config))
    r = export(tiny_bpe_llama, tmp_path / "out")
    message = assert_clean_failure(r, tmp_path / "out", "holds a Gemma 1 model ('gemma'), which edgeprune does not support")
    assert "'qwen3', 'gemma3_text'" in message  # naming what is supported


@pytest.mark.parametrize("key", ["attention_bias", "mlp_bias"])
def test_config_promising_biases_the_weights_lack_is_refused(tiny_bpe_llama, tmp_path, key):
    """Biases are converted (tests/test_layouts.py); a config that claims them without the tensors is refused by name."""
    config = json.loads((tiny_bpe_llama / "config.json").read_text())
    config[key] = True
    (tiny_bpe_llama / "config.json").write_text(json.dumps(config))
    r = export(tiny_bpe_llama, tmp_path / "out")
    message = assert_clean_failure(r, tmp_path / "out", "does not match the weights")
    assert ".bias" in message, message


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
    from edgeprune.device.profiles import load_profile

    text = load_profile(PROFILE_OK).path.read_text()
    broken = tmp_path / "broken.toml"
    broken.write_text("\n".join(l for l in text.splitlines() if not l.startswith("memory_bandwidth_gbs")))
    r = export(tiny_bpe_llama, tmp_path / "out", profile=str(broken))
    assert_clean_failure(r, tmp_path / "out", "memory_bandwidth_gbs")


def test_output_directory_not_writable(tiny_bpe_llama, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output directory should go")
    r = export(tiny_bpe_llama, blocker / "out")
    assert_clean_failure(r, tmp_path / "nothing-else", "output directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "tiny-bpe"]  # nothing was written
    assert blocker.read_text() == "a file where the output directory should go"


def _eval_text(tmp_path: Path, words: int) -> str:
    path = tmp_path / "eval.txt"
    path.write_text(" ".join(["word"] * words))
    return str(path)


# Each bad flag or input: the extra arguments (a function of tmp_path) and a word of the one-line message.
BAD_EXPORT_FLAGS = {
    "ffn above 1": (lambda tmp: ["--ffn", "1.2"], "ffn ratio 1.2 is outside"),
    "unknown method": (lambda tmp: ["--method", "l1"], "unknown method 'l1'"),
    "unknown allocation": (lambda tmp: ["--allocation", "foo"], "unknown allocation 'foo'"),
    "too many layers": (lambda tmp: ["--layers", "99"], "cannot remove 99 of 3 layers"),
    "method alone prunes nothing": (lambda tmp: ["--method", "flap"], "nothing to prune"),
    "zero eval chunks": (lambda tmp: ["--eval-chunks", "0"], "--eval-chunks 0 scores nothing"),
    "tiny eval ctx": (lambda tmp: ["--eval-ctx", "8"], "--eval-ctx 8 is too small"),
    "eval text too short": (lambda tmp: ["--eval", _eval_text(tmp, 20)], "chunk(s) of 512 need 10240"),
    "calib is a directory": (lambda tmp: ["--calib", str(tmp)], "is a directory"),
    "eval is missing": (lambda tmp: ["--eval", str(tmp / "none.txt")], "does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_EXPORT_FLAGS))
def test_bad_flags_fail_before_loading_and_write_nothing(tiny_bpe_llama, tmp_path, case):
    make_args, expected = BAD_EXPORT_FLAGS[case]
    out = tmp_path / "out"
    r = export(tiny_bpe_llama, out, *make_args(tmp_path))
    assert_clean_failure(r, out, expected)
    assert "loading" not in r.stderr, r.stderr[-2000:]  # refused before the model was loaded


def test_eval_text_too_short_for_the_tokens_is_refused_before_writing(tiny_bpe_llama, tmp_path):
    """Long enough in bytes, too short in tokens (the tokenizer merges whole words): caught right after loading,
    still before any file is written."""
    from conftest import TRAINING_TEXT

    text = tmp_path / "eval.txt"
    text.write_text(TRAINING_TEXT)
    chunks = len(TRAINING_TEXT.encode()) // 128 - 1  # fits the byte count, not the token count
    out = tmp_path / "out"
    r = export(tiny_bpe_llama, out, "--eval", str(text), "--eval-ctx", "128", "--eval-chunks", str(chunks),
               "--eval-fixed")
    assert_clean_failure(r, out, f"{chunks} chunk(s) of 128 need")
    assert "loading" in r.stderr  # this one needed the tokenizer


def test_unreadable_calibration_text_is_one_line(tiny_bpe_llama, tmp_path):
    """A file that exists but cannot be read. Tests run as root, which reads past any permission bits, so the file
    is one the kernel refuses to read to anyone: /proc/self/mem at offset 0 fails with EIO."""
    out = tmp_path / "out"
    r = export(tiny_bpe_llama, out, "--calib", "/proc/self/mem")
    assert_clean_failure(r, out, "cannot be read")


def test_prune_that_removes_nothing_is_refused(tiny_bpe_llama, tmp_path):
    out = tmp_path / "out"
    r = run_cli("prune", str(tiny_bpe_llama), "--out", str(out), "--method", "flap")
    assert_clean_failure(r, out, "nothing to prune")
    r = run_cli("prune", str(tiny_bpe_llama), "--out", str(out), "--ffn", "0.01")
    assert_clean_failure(r, out, "remove nothing")  # 1% of 96 channels is less than one aligned block of 32


@pytest.mark.parametrize("extra, expected", [
    (["--on-device"], "needs --profile"),
    (["--profile", "x86-laptop-16gb"], "--on-device"),
    (["--profile", "x86-laptop-16gb", "--on-device", "--eval-chunks", "0"], "--eval-chunks 0"),
])
def test_update_profile_preconditions_are_checked_before_measuring(smollm2_gguf, tmp_path, extra, expected):
    r = run_cli("validate", str(smollm2_gguf), "--update-profile", str(tmp_path / "mine.toml"), *extra)
    assert_clean_failure(r, tmp_path, expected)
    assert "measuring" not in r.stderr and "perplexity" not in r.stderr, r.stderr[-2000:]


def test_update_profile_never_writes_a_shipped_profile(smollm2_gguf, tmp_path):
    from edgeprune.device.profiles import load_profile

    shipped = load_profile("x86-laptop-16gb").path
    before = shipped.read_bytes()
    r = run_cli("validate", str(smollm2_gguf), "--profile", "x86-laptop-16gb", "--on-device",
                "--update-profile", str(shipped))
    assert_clean_failure(r, tmp_path, "shipped profiles")
    assert shipped.read_bytes() == before


def test_internal_error_is_one_line_exit_3_and_a_log(tmp_path):
    """A bug of ours (here: a function that divides by zero) is not "bad input": exit 3, and the traceback is in
    the log file the line names."""
    code = ("import edgeprune.device.profiles as p, edgeprune.cli as c; p.list_profiles = lambda: 1 / 0; "
            "import sys; sys.argv = ['edgeprune', 'profiles', 'list']; c.main()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=CLI_ENV)
    assert r.returncode == 3, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "internal error (ZeroDivisionError" in lines[0], r.stderr
    log = Path(re.search(r"traceback is in (\S+):", lines[0])[1])
    try:
        assert "Traceback" in log.read_text() and "ZeroDivisionError" in log.read_text()
    finally:
        log.unlink()


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


def test_help_lists_commands_and_exit_codes():
    r = run_cli("--help")
    assert r.returncode == 0
    section = r.stdout.split("Commands:", 1)[1]
    listed = {line.split()[0] for line in section.splitlines() if line.startswith("  ") and line.split()}
    assert {"export", "plan", "profiles", "prune", "validate"} <= listed, r.stdout
    exits = " ".join(r.stdout.split())
    for code in ("0 pass", "1 a budget", "2 bad input", "3 an internal error", "130 interrupted"):
        assert code in exits, r.stdout
