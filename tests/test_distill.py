"""Recovery by distillation: the loss is the KL divergence it claims, training brings a pruned student closer to its
teacher on held-out windows, and a run interrupted by a real signal resumes to the same bytes."""

from __future__ import annotations

import copy
import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CLI_ENV, run_cli

from edgeprune.build.loading import load_model
from edgeprune.build.pruning import PruneOptions, prune_model
from edgeprune.build.pruning.distill import DistillOptions, TeacherCache, distill, topk_kl, windows
from edgeprune.core.texts import default_calibration_text


@pytest.fixture
def recovery_file(tmp_path: Path) -> Path:
    path = tmp_path / "recovery.txt"
    path.write_text(default_calibration_text().content[:400_000])
    return path


def test_topk_kl_is_the_kl_divergence_when_k_covers_the_vocabulary():
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 5, 30), torch.randn(2, 5, 30)
    logp = torch.log_softmax(teacher, -1)
    exact = (logp.exp() * (logp - torch.log_softmax(student, -1))).sum(-1).mean()
    top = logp.topk(30, dim=-1)
    tail = torch.full((2, 5), -30.0)  # no mass outside the top-k
    assert torch.allclose(topk_kl(student, top.values, top.indices, tail), exact, atol=1e-5)
    top = logp.topk(8, dim=-1)  # the tail taken as one token: a lower bound, still positive
    tail = torch.log1p(-top.values.exp().sum(-1))
    approx = topk_kl(student, top.values, top.indices, tail)
    assert 0 < approx <= exact + 1e-6
    assert float(topk_kl(teacher, top.values, top.indices, tail)) == pytest.approx(0.0, abs=1e-5)


def _student_and_teacher(model_path, recovery_file, options, directory):
    """A tiny Llama pruned to half its MLP channels, and its teacher's cached outputs on the recovery file."""
    from edgeprune.core.texts import read_text_file

    loaded = load_model(model_path)
    teacher = loaded.model
    train, held = windows([read_text_file(recovery_file, "recovery")], loaded.tokenizer, options, 1)
    cache = TeacherCache.build(teacher, train, held, options.top_k, directory / "teacher")
    ids = loaded.tokenizer(default_calibration_text().content[:200_000], add_special_tokens=False)["input_ids"]
    student = prune_model(copy.deepcopy(teacher), ids, PruneOptions(ffn=0.5, calib_sequences=8, calib_seq_len=64)).model
    return student, cache, train, held


def test_distillation_brings_the_pruned_student_closer_on_held_out_windows(tiny_bpe_llama, recovery_file, tmp_path):
    options = DistillOptions(steps=60, batch_size=4, seq_len=64, top_k=16, held_out=4, eval_every=20, patience=5)
    student, cache, train, held = _student_and_teacher(tiny_bpe_llama, recovery_file, options, tmp_path)
    assert train.shape == (240, 64) and held.shape == (4, 64)
    before = [p.detach().clone() for p in student.model.embed_tokens.parameters()]
    untrained = copy.deepcopy(student)
    result = distill(student, cache, options, tmp_path / "ckpt.pt")
    assert result.steps == 60 and result.resumed_from == 0 and result.kept_step == 60
    assert result.held_out_kld[-1] < 0.95 * result.held_out_kld[0], result.held_out_kld
    assert sorted(result.held_out_kld, reverse=True) == result.held_out_kld  # better at every measurement
    assert all(torch.equal(a, b) for a, b in zip(before, student.model.embed_tokens.parameters()))  # head stays
    # the finished run's checkpoint makes the same call on the same student return at once, with the same weights
    again = distill(untrained, cache, options, tmp_path / "ckpt.pt")
    trained = dict(student.named_parameters())
    assert again.resumed_from == 60 and all(torch.equal(trained[n], p) for n, p in untrained.named_parameters())


def test_a_run_that_only_hurts_ends_with_the_weights_of_its_best_measurement(tiny_bpe_llama, recovery_file, tmp_path):
    """A learning rate far too high: every held-out measurement after the first is worse, so the student ends with
    the weights it started from, and the best-weights file is gone."""
    options = DistillOptions(steps=40, batch_size=4, seq_len=64, top_k=16, held_out=4, eval_every=20, patience=5,
                             learning_rate=0.05)
    student, cache, _, _ = _student_and_teacher(tiny_bpe_llama, recovery_file, options, tmp_path)
    untrained = copy.deepcopy(student)
    result = distill(student, cache, options, tmp_path / "ckpt.pt")
    assert result.steps == 40 and min(result.held_out_kld[1:]) > result.held_out_kld[0], result.held_out_kld
    assert result.kept_step == 0
    start = dict(untrained.named_parameters())
    assert all(torch.equal(start[n], p) for n, p in student.named_parameters())
    assert not (tmp_path / "ckpt-best.pt").exists() and (tmp_path / "ckpt.pt").is_file()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_interrupted_recovery_resumes_to_the_same_gguf(tiny_bpe_llama, recovery_file, tmp_path):
    """SIGINT in the middle of distillation: exit 130 with a checkpoint; the same command resumes from it and
    writes the bytes an uninterrupted run writes."""
    args = [str(tiny_bpe_llama), "--profile", "x86-laptop-16gb", "--quant", "Q8_0", "--ffn", "0.5",
            "--prune-steps", "2", "--distill-steps", "300", "--recovery-text", str(recovery_file),
            "--eval-chunks", "1", "--eval-ctx", "128"]
    whole = run_cli("export", *args, "--out", str(tmp_path / "whole"), timeout=900)
    verdict = json.loads((tmp_path / "whole" / "report.json").read_text())["validation"]["passed"]
    assert whole.returncode == (0 if verdict else 1), whole.stderr[-3000:]
    assert "pruning step 2/2 done" in whole.stderr and "distillation: held-out KL" in whole.stderr

    out, log = tmp_path / "resumed", tmp_path / "interrupted.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "edgeprune.cli", "export", *args, "--out", str(out)],
                                stdout=subprocess.DEVNULL, stderr=err, env=CLI_ENV)
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            _, second, after = log.read_text().partition("pruning step 2/2 done")
            if second and "distillation: step 5/300" in after:  # in the second pruning step's recovery
                proc.send_signal(signal.SIGINT)
                break
            time.sleep(0.001)
        proc.wait(timeout=600)
    text = log.read_text()
    assert proc.returncode == 130, text[-3000:]
    assert (out / ".edgeprune-recovery" / "step-1.pt").is_file(), text[-3000:]
    assert not list(out.glob("*.gguf")) or not any("Q8_0" in p.name for p in out.glob("*.gguf"))
    resumed = run_cli("export", *args, "--out", str(out), timeout=900)
    assert resumed.returncode == whole.returncode, resumed.stderr[-3000:]
    assert "distillation: resuming at step" in resumed.stderr
    name = next(p.name for p in (tmp_path / "whole").glob("*-Q8_0.gguf"))
    assert _sha(out / name) == _sha(tmp_path / "whole" / name)
    assert not (out / ".edgeprune-recovery").exists()


def test_the_planner_chooses_recovery_when_the_profile_gives_it_time(tiny_bpe_llama, recovery_file, tmp_path):
    """A file budget that forces pruning and --recovery-minutes: the plan is a recovered cut, the export distils it
    from the unpruned model, and the report says how."""
    import dataclasses
    import json

    from converters import ConversionInput
    from edgeprune.build.sizing import estimate_size
    from edgeprune.device.profile_writing import profile_to_toml
    from edgeprune.device.profiles import load_profile
    from edgeprune.core.shapes import shape_of

    loaded = load_model(tiny_bpe_llama)
    q4 = estimate_size(ConversionInput(loaded.model, loaded.vocab, "tiny", 256), shape_of(loaded.model),
                       "Q4_0").file_bytes / (1 << 20)
    base = load_profile("x86-laptop-16gb")
    profile = tmp_path / "tight.toml"
    profile.write_text(profile_to_toml(dataclasses.replace(base, budgets=dataclasses.replace(
        base.budgets, context_length=256, max_file_mib=q4 * 0.97))))
    out = tmp_path / "out"
    result = run_cli("export", str(tiny_bpe_llama), "--profile", str(profile), "--out", str(out),
                     "--recovery-minutes", "5", "--recovery-text", str(recovery_file), "--eval-chunks", "1",
                     "--eval-ctx", "128", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]  # the plan meets the file budget; speed is predicted
    plan_line = next(line for line in result.stderr.splitlines() if "] plan: " in line)
    assert "+ distillation" in plan_line and "distillation: held-out KL" in result.stderr
    export = json.loads((out / "report.json").read_text())["export"]
    assert export["plan"]["chosen"]["recovered"] and export["plan"]["chosen"]["recovery_minutes"] < 5
    distillation = export["pruning"]["distillation"]
    assert distillation["options"]["steps"] == 120 and distillation["steps"][0]["steps"] >= 1
    assert not (out / ".edgeprune-recovery").exists()


def test_a_build_distils_every_recovered_target_from_one_teacher_pass(tiny_bpe_llama, recovery_file, tmp_path):
    """Two targets with recovery time: the teacher runs over the recovery text once, for the first; the second
    reuses its outputs. A teacher with other weights does not reuse them."""
    import dataclasses

    from converters import ConversionInput
    from edgeprune.build.builds.buildfile import load_build_file
    from edgeprune.build.builds.runner import run_build
    from edgeprune.build.sizing import estimate_size
    from edgeprune.device.profile_writing import profile_to_toml
    from edgeprune.device.profiles import load_profile
    from edgeprune.core.shapes import shape_of

    loaded = load_model(tiny_bpe_llama)
    q4 = estimate_size(ConversionInput(loaded.model, loaded.vocab, "tiny", 256), shape_of(loaded.model),
                       "Q4_0").file_bytes / (1 << 20)
    base = load_profile("x86-laptop-16gb")
    (tmp_path / "tight.toml").write_text(profile_to_toml(dataclasses.replace(base, budgets=dataclasses.replace(
        base.budgets, context_length=256, max_file_mib=q4 * 0.97))))
    path = tmp_path / "edgeprune.toml"
    path.write_text(f'[model]\npath = "{tiny_bpe_llama}"\n[texts]\nrecovery = "{recovery_file.name}"\n'
                    '[evaluation]\ncontext = 128\nchunks = 1\n'
                    '[[targets]]\nname = "a"\nprofile = "tight.toml"\nrecovery_minutes = 5\n'
                    '[[targets]]\nname = "b"\nprofile = "tight.toml"\nrecovery_minutes = 5\ncontext_length = 128\n')
    said: list[str] = []
    result = run_build(load_build_file(path), progress=said.append)
    assert [o.status for o in result.targets] == ["built", "built"], [o.error for o in result.targets]
    assert all("+ distillation" in o.entry["plan"] for o in result.targets)
    teacher_lines = [line for line in said if "distillation: teacher top-" in line]
    assert teacher_lines and all(line.startswith("[a 1/2]") for line in teacher_lines)
    assert any(line.startswith("[b 2/2] distillation: held-out KL") for line in said)

    from edgeprune.build.pruning.distill import TeacherCache, windows
    from edgeprune.core.texts import read_text_file

    options = DistillOptions()
    train, held = windows([read_text_file(recovery_file, "recovery")], loaded.tokenizer, options,
                          loaded.model.config.bos_token_id)
    shared = tmp_path / "out" / ".shared" / "teacher"
    stamp = (shared / "stamp").read_text()
    TeacherCache.build(loaded.model, train, held, options.top_k, shared)
    assert (shared / "stamp").read_text() == stamp  # the same teacher: reused as it is
    with torch.no_grad():
        loaded.model.model.norm.weight.mul_(1.01)
    TeacherCache.build(loaded.model, train, held, options.top_k, shared)
    assert (shared / "stamp").read_text() != stamp  # other weights: scored again
