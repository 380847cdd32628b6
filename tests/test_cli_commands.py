"""Every command and flag the README documents, run through the real CLI in a child process and checked by the value
a user would look at: the GGUF's keys and blocks, the report's fields, the numbers printed. Tiny random models keep
it quick; two exports are made once for the module and read by several tests."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import gguf
import pytest

from edgeprune.core.codedigest import version_string
from edgeprune.device.profile_writing import profile_to_toml
from edgeprune.device.profiles import load_profile

from conftest import CLI_ENV, run_cli, run_export
from test_build import _build_file, _ggufs
from test_remote import EDGEPRUNE, _keygen, _sleeping_edgeprune, _stop_sleeper, sshd  # noqa: F401 (a fixture)
from test_reporting import markdown_rows

EVAL = ["--eval-chunks", "2", "--eval-fixed", "--eval-ctx", "64", "--threads", "1"]
LAPTOP = "x86-laptop-16gb"
PROFILES = Path(__file__).resolve().parents[1] / "profiles"


def _gguf_fields(path: Path) -> dict:
    return {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()}


def _tensors(path: Path) -> dict[str, bytes]:
    return {t.name: bytes(t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _ok(result, *codes: int):
    assert result.returncode in (codes or (0,)), result.stderr[-3000:]
    return result


# --- the shared models and exports

@pytest.fixture(scope="module")
def tiny(_tiny_bpe_llama_once) -> Path:
    """The session's tiny random Llama with a byte-level BPE tokenizer, in safetensors: only read here."""
    return _tiny_bpe_llama_once


@pytest.fixture(scope="module")
def pickled(tiny, tmp_path_factory) -> Path:
    """The same model with its weights in a pickle (pytorch_model.bin) only."""
    import torch
    from safetensors.torch import load_file

    d = tmp_path_factory.mktemp("pickled") / "tiny-pickled"
    shutil.copytree(tiny, d)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    return d


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory) -> Path:
    from edgeprune.core.texts import default_evaluation_text

    path = tmp_path_factory.mktemp("texts") / "eval.txt"
    path.write_text(default_evaluation_text().content[:40_000])
    return path


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    from edgeprune.core.texts import default_calibration_text

    path = tmp_path_factory.mktemp("texts") / "calib.txt"
    path.write_text(default_calibration_text().content[:60_000])
    return path


@pytest.fixture(scope="module")
def pruned(tiny, calib_file, eval_file, tmp_path_factory):
    """One layer removed by wanda-sp, 4 calibration sequences of a given text, torch on the CPU, speed judged as
    measured here."""
    out = tmp_path_factory.mktemp("pruned") / "out"
    result = run_export(tiny, out, "--quant", "Q8_0", "--layers", "1", "--method", "wanda-sp", "--calib",
                        str(calib_file), "--calib-sequences", "4", "--device", "cpu", "--on-device", "--eval",
                        str(eval_file), *EVAL, profile=LAPTOP)
    return out, _ok(result, 0, 1)


@pytest.fixture(scope="module")
def plain(pickled, eval_file, tmp_path_factory):
    """The pickled model, unpruned, at Q8_0 without an importance matrix, with predictions for a host profile."""
    out = tmp_path_factory.mktemp("plain") / "out"
    result = run_export(pickled, out, "--quant", "Q8_0", "--no-imatrix", "--allow-pickle", "--eval", str(eval_file),
                        "--host-profile", str(PROFILES / "apple-m1-8gb.toml"), *EVAL, profile=LAPTOP)
    return out, _ok(result, 0, 1)


# --- the commands that read no model

def test_version_prints_the_code_digest():
    result = _ok(run_cli("--version"))
    assert result.stdout == f"edgeprune, version {version_string()}\n"


def test_profiles_list_names_every_shipped_profile_with_its_budgets():
    lines = _ok(run_cli("profiles", "list")).stdout.splitlines()
    files = sorted(PROFILES.glob("*.toml"))
    assert len(lines) == len(files) > 0
    for path in files:
        budgets = tomllib.loads(path.read_text())["budgets"]
        line = next((line for line in lines if line.split()[0] == path.stem), None)
        assert line is not None, (path.stem, lines)
        assert f"{budgets['memory_mib']:.0f} MiB" in line and f"ctx {budgets['context_length']:>5}" in line
        assert f">= {budgets['min_decode_tps']:g} tok/s" in line and f"TTFT <= {budgets['max_ttft_s']:g} s" in line


def test_profiles_show_prints_the_budgets_of_the_file_by_name_and_by_path(tmp_path):
    path = PROFILES / "raspberry-pi-5-8gb.toml"
    in_file = tomllib.loads(path.read_text())
    shown = tomllib.loads(_ok(run_cli("profiles", "show", "raspberry-pi-5-8gb")).stdout)
    assert {k: shown["budgets"][k] for k in in_file["budgets"]} == in_file["budgets"]
    assert shown["device"]["memory_bandwidth_gbs"] == in_file["device"]["memory_bandwidth_gbs"]
    profile = load_profile("raspberry-pi-5-8gb")
    mine = tmp_path / "mine.toml"
    mine.write_text(profile_to_toml(dataclasses.replace(
        profile, budgets=dataclasses.replace(profile.budgets, memory_mib=1234.5))))
    assert tomllib.loads(_ok(run_cli("profiles", "show", str(mine))).stdout)["budgets"]["memory_mib"] == 1234.5


def test_profiles_measure_writes_a_profile_of_this_machine(tiny, tmp_path):
    out = tmp_path / "host.toml"
    result = _ok(run_cli("profiles", "measure", "--out", str(out), "--model", str(tiny), "--threads", "1"))
    device = load_profile(out).device
    assert f"loading {tiny}" in result.stderr  # the model given, not SmolLM2
    assert device.threads == 1 and {"f16", "q8_0"} <= set(device.decode_type_efficiency)
    assert result.stdout.startswith(f"wrote {out}: {device.memory_bandwidth_gbs:.1f} GB/s, "
                                    f"{device.compute_gflops:.1f} GFLOPS, 1 threads, decode efficiency "
                                    f"{device.decode_efficiency:.3f}, prefill efficiency {device.prefill_efficiency:.3f}")


def test_plan_quant_narrows_the_choice_to_that_type(tiny):
    def chosen(*extra):
        return json.loads(_ok(run_cli("plan", str(tiny), "--profile", LAPTOP, "--json", *extra)).stdout)["chosen"]

    assert chosen("--quant", "Q8_0")["quant"] == "Q8_0"  # unasked, the laptop's plan keeps this model at F16


def test_plan_mix_ranks_mixed_candidates(tiny):
    def plan(*extra):
        return json.loads(_ok(run_cli("plan", str(tiny), "--profile", LAPTOP, "--quant", "Q4_K_M", "--json",
                                      *extra)).stdout)


    chosen = plan("--mix")["chosen"]  # unasked, no candidate is mixed
    assert chosen["mixed"] and chosen["label"] == "Q4_K_M mixed"


@pytest.fixture(scope="module")
def tight(tiny, tmp_path_factory) -> Path:
    """The laptop with a file budget under the model's Q4_0 size: only pruning meets it."""
    from converters import ConversionInput
    from edgeprune.build.sizing import estimate_size
    from edgeprune.build.loading import load_model
    from edgeprune.core.shapes import shape_of

    loaded = load_model(tiny)
    q4 = estimate_size(ConversionInput(loaded.model, loaded.vocab, "tiny", 256), shape_of(loaded.model),
                       "Q4_0").file_bytes / (1 << 20)
    base = load_profile(LAPTOP)
    path = tmp_path_factory.mktemp("profiles") / "tight.toml"
    path.write_text(profile_to_toml(dataclasses.replace(base, budgets=dataclasses.replace(
        base.budgets, context_length=256, max_file_mib=q4 * 0.97))))
    return path


def test_plan_recovery_minutes_lets_a_recovered_cut_win(tiny, tight):
    plan = json.loads(_ok(run_cli("plan", str(tiny), "--profile", str(tight), "--json", "--recovery-minutes",
                                  "5")).stdout)  # unasked, this profile gives no recovery time
    recovered = plan["chosen"]
    assert recovered["recovered"] and "+ distillation" in recovered["label"] and recovered["recovery_minutes"] < 5
    # `plan` reads no weights, so it cannot time a recovery here, and says whose minutes it quotes
    assert "measured recovery_table.toml" in plan["why"] and "not timed here" in plan["why"]


def test_search_measured_keeps_the_candidate_llama_cpp_scores_best_in_plan_and_export(tiny, tight, tmp_path):
    plan = json.loads(_ok(run_cli("plan", str(tiny), "--profile", str(tight), "--json", "--search", "measured",
                                  "--threads", "1")).stdout)
    measured = plan["measured"]
    assert len(measured) >= 2 and plan["why"].startswith("lowest PPL measured by llama.cpp")
    assert plan["chosen"]["label"] == min(measured, key=lambda m: m["measured_loss"])["label"]
    _ok(run_export(tiny, tmp_path / "out", "--search", "measured", "--eval-chunks", "1", "--eval-fixed", "--eval-ctx", "64",
                   "--threads", "1", profile=str(tight)), 0, 1)
    exported = _report(tmp_path / "out")["export"]["plan"]
    assert exported["measured"] == measured and exported["chosen"]["label"] == plan["chosen"]["label"]


# --- export flags, read from the two shared exports

def test_layers_removes_one_block_by_the_method_asked(pruned, tiny):
    out, _ = pruned
    export = _report(out)["export"]
    fields = _gguf_fields(out / export["gguf"])
    assert fields["llama.block_count"] == 2  # the model has 3
    assert _gguf_fields(out / "reference-F16.gguf")["llama.block_count"] == 3
    assert export["pruning"]["details"]["method"] == "wanda-sp"
    assert len(export["pruning"]["details"]["dropped_layers"]) == 1


def test_calib_and_calib_sequences_set_the_calibration_pass(pruned, calib_file):
    out, result = pruned
    passes = {line.split("(")[-1] for line in result.stderr.splitlines() if "] calibration: layer" in line}
    assert passes == {"4 sequences of 256 tokens)"}, passes
    assert _report(out)["export"]["imatrix"]["text"] == calib_file.name
    assert _gguf_fields(out / _report(out)["export"]["gguf"])["quantize.imatrix.dataset"] == calib_file.name


def test_host_profile_adds_predictions_for_this_machine(plain):
    validation = _report(plain[0])["validation"]
    assert validation["predicted_host"]["device"] == load_profile("apple-m1-8gb").device.name
    assert validation["predicted_device"]["device"] == load_profile(LAPTOP).device.name


def test_on_device_judges_the_speed_measured_here(pruned, plain):
    on, off = _report(pruned[0])["validation"], _report(plain[0])["validation"]
    assert on["on_device"] is True and off["on_device"] is False
    decode = next(c for c in on["checks"] if c["name"] == "decode_tps")
    assert decode["basis"] == "measured here" and decode["measured"] == on["speed"]["decode_tps"]
    assert next(c for c in off["checks"] if c["name"] == "decode_tps")["basis"].startswith("predicted for ")


def test_no_imatrix_writes_no_imatrix_keys(plain, pruned):
    out, _ = plain
    export = _report(out)["export"]
    assert export["imatrix"]["used"] is False
    assert not [k for k in _gguf_fields(out / export["gguf"]) if k.startswith("quantize.imatrix.")]
    with_imatrix = _gguf_fields(pruned[0] / _report(pruned[0])["export"]["gguf"])
    assert with_imatrix["quantize.imatrix.entries_count"] > 0  # the same check sees them when they are there


def test_allow_pickle_loads_the_same_weights_as_safetensors(plain, pruned):
    """The pickled model's F16 reference holds the very tensors of the safetensors model's."""
    assert _tensors(plain[0] / "reference-F16.gguf") == _tensors(pruned[0] / "reference-F16.gguf")


def test_device_cpu_computes_on_the_cpu(tiny, tmp_path):
    """--device cpu prunes on the CPU whatever torch sees: the same bytes as a run with every GPU hidden. (Only where
    torch sees a CUDA GPU can this fail: without one, both runs are CPU runs.)"""
    args = ["prune", str(tiny), "--ffn", "0.3", "--calib-sequences", "2"]
    _ok(run_cli(*args, "--out", str(tmp_path / "asked"), "--device", "cpu"))
    hidden = subprocess.run([sys.executable, "-m", "edgeprune.cli", *args, "--out", str(tmp_path / "hidden")],
                            capture_output=True, text=True, timeout=600, env=dict(CLI_ENV, CUDA_VISIBLE_DEVICES=""))
    _ok(hidden)
    (asked,), (gpu_less,) = (list((tmp_path / d).glob("*.gguf")) for d in ("asked", "hidden"))
    assert _sha(asked) == _sha(gpu_less)


# --- validate and report, on the shared exports

def test_validate_reference_and_eval_score_as_the_export_did(plain, eval_file, tmp_path):
    out, _ = plain
    export = _report(out)
    path = tmp_path / "v.json"
    _ok(run_cli("validate", str(out / export["export"]["gguf"]), "--reference", str(out / "reference-F16.gguf"),
                "--eval", str(eval_file), *EVAL, "--json", str(path)))
    here, there = json.loads(path.read_text())["validation"], export["validation"]
    assert here["eval_text"] == there["eval_text"] == eval_file.name
    assert here["perplexity"]["ppl"] == pytest.approx(there["perplexity"]["ppl"], rel=1e-6)
    assert here["divergence"]["reference_gguf"] == str(out / "reference-F16.gguf")
    assert 0 < here["divergence"]["kld_mean"] == pytest.approx(there["divergence"]["kld_mean"], rel=1e-4)


def test_validate_bundle_with_another_profile_and_update_profile(plain, tmp_path):
    from edgeprune.device.costmodel import predict_gguf
    from edgeprune.device.gguf_check import read_gguf

    bundle = tmp_path / "bundle"
    shutil.copytree(plain[0] / "bundle", bundle)
    pi = load_profile("raspberry-pi-5-8gb")
    report, written = tmp_path / "r.json", tmp_path / "measured" / "pi-here.toml"
    result = run_cli("validate", str(bundle), "--profile", "raspberry-pi-5-8gb", "--update-profile", str(written),
                     "--threads", "1", "--json", str(report))
    _ok(result, 0, 1)
    validation = json.loads(report.read_text())["validation"]
    memory = next(c for c in validation["checks"] if c["name"] == "memory")
    assert memory["limit"] == pi.budgets.memory_mib != load_profile(LAPTOP).budgets.memory_mib
    updated = load_profile(written)
    assert updated.budgets == pi.budgets
    predicted = predict_gguf(read_gguf(bundle / "model.gguf"), updated).decode_tps
    assert predicted == pytest.approx(validation["speed"]["decode_tps"], rel=0.01)


def test_report_merges_exports_into_one_page_with_their_numbers_and_verdicts(plain, pruned, tmp_path):
    page = tmp_path / "pages" / "compare.html"
    _ok(run_cli("report", str(plain[0] / "report.json"), str(pruned[0]), "--out", str(page)))
    rows = {row[0]: row[1:] for row in markdown_rows(page.with_suffix(".md").read_text())}
    validations = [_report(out)["validation"] for out in (plain[0], pruned[0])]
    assert rows["PPL"] == [f"{v['perplexity']['ppl']:.3f}" for v in validations]
    assert rows["verdict"] == [{True: "PASS", False: "FAIL"}[v["passed"]] for v in validations]
    html = page.read_text()
    assert all(f"{v['perplexity']['ppl']:.3f}" in html for v in validations)


# --- build

def test_build_jobs_2_builds_the_same_files_as_jobs_1(tiny, tmp_path):
    """Two targets at once (their progress lines interleave; one at a time they do not), to the same bytes."""
    results = {}
    for jobs in ("1", "2"):
        path = _build_file(tmp_path, tiny, out=f"out{jobs}", name=f"jobs{jobs}.toml")
        result = _ok(run_cli("build", str(path), "--jobs", jobs, "--threads", "1", timeout=900), 0, 1)
        assert "2 built" in result.stdout
        lines = result.stderr.splitlines()
        first_laptop = next(i for i, line in enumerate(lines) if "[laptop 2/2]" in line)
        last_pi5 = max(i for i, line in enumerate(lines) if "[pi5 1/2]" in line)
        assert (first_laptop < last_pi5) == (jobs == "2"), lines
        manifest = json.loads((tmp_path / f"out{jobs}" / "manifest.json").read_text())
        results[jobs] = ({name: sha for name, (sha, _) in _ggufs(tmp_path / f"out{jobs}").items()},
                         {name: (e["plan"], e["passed"]) for name, e in manifest["targets"].items()})
    assert set(results["1"][0]) == {"pi5", "laptop"}
    assert results["2"] == results["1"]


# --- validate BUNDLE --remote: the SSH glue, against test_remote.py's real sshd

def _remote(sshd, bundle: Path, *extra: str, **given: str):
    flags = {"--identity": str(sshd.identity), "--known-hosts": str(sshd.known_hosts),
             "--remote-command": str(EDGEPRUNE), **given}
    return run_cli("validate", str(bundle), "--remote", str(sshd.target), *(x for kv in flags.items() for x in kv),
                   "--threads", "1", *extra, timeout=300)


def test_remote_runs_in_the_remote_dir_and_brings_the_report_home(sshd, plain, tmp_path):  # noqa: F811
    bundle = tmp_path / "bundle"
    shutil.copytree(plain[0] / "bundle", bundle)
    remote_dir = tmp_path / "on-the-device"
    result = _remote(sshd, bundle, "--remote-dir", str(remote_dir), "--remote-timeout", "240")
    host = json.loads((bundle / "manifest.json").read_text())
    assert result.returncode in (0, 1), result.stderr[-3000:]
    assert {*host["files"], "manifest.json"} <= {p.name for p in remote_dir.iterdir()}
    assert _sha(remote_dir / "model.gguf") == _sha(bundle / "model.gguf")
    report = json.loads((bundle / "report-127.0.0.1.json").read_text())
    expected = json.loads((bundle / "expected.json").read_text())["host_validation"]
    assert report["validation"]["perplexity"]["ppl"] == pytest.approx(expected["perplexity"]["ppl"], rel=1e-6)
    assert result.returncode == (0 if report["validation"]["passed"] else 1)
    assert (bundle / "report-127.0.0.1.html").is_file() and (bundle / "report-127.0.0.1.md").is_file()


def test_remote_credentials_and_timeout_are_the_ones_given(sshd, plain, tmp_path):  # noqa: F811
    bundle = plain[0] / "bundle"
    (tmp_path / "empty").write_text("")
    cases = [({"--identity": str(_keygen(tmp_path / "other_key"))}, "refused the key"),
             ({"--known-hosts": str(tmp_path / "empty")}, "host key is not in known_hosts")]
    for given, words in cases:
        result = _remote(sshd, bundle, **given)
        assert result.returncode == 2 and words in result.stderr, result.stderr[-3000:]
    start = time.monotonic()
    try:
        result = _remote(sshd, bundle, "--remote-dir", str(tmp_path / "r"), "--remote-timeout", "5",
                         **{"--remote-command": _sleeping_edgeprune(tmp_path)})
    finally:
        _stop_sleeper(tmp_path)
    assert result.returncode == 2 and "did not finish in time" in result.stderr, result.stderr[-3000:]
    assert time.monotonic() - start < 60
