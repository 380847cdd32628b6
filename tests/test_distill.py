"""Recovery by distillation: the loss is the KL divergence it claims, training brings a pruned student closer to its
teacher on held-out windows, and a run interrupted by a real signal resumes to the same bytes."""

from __future__ import annotations

import copy
import dataclasses
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
from edgeprune.build.pruning.distill import DistillOptions, TeacherCache, distill, recovery_loss, topk_kl, windows
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


def test_the_recovery_loss_mixes_the_kl_with_the_next_token_cross_entropy():
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 5, 30), torch.randn(2, 5, 30)
    tokens = torch.randint(0, 30, (2, 5))
    top = torch.log_softmax(teacher, -1).topk(8, dim=-1)
    tail = torch.log1p(-top.values.exp().sum(-1))
    kl = topk_kl(student, top.values, top.indices, tail)
    nll = -torch.log_softmax(student, -1)[:, :-1].gather(-1, tokens[:, 1:, None]).mean()  # position t predicts t + 1
    args = (student, tokens, top.values, top.indices, tail)
    assert torch.allclose(recovery_loss(*args, 0.0), kl)
    assert torch.allclose(recovery_loss(*args, 1.0), nll)
    assert torch.allclose(recovery_loss(*args, 0.25), 0.75 * kl + 0.25 * nll)


def test_a_label_weight_outside_zero_to_one_is_refused():
    from edgeprune.core.errors import EdgepruneError

    with pytest.raises(EdgepruneError, match="label_weight must be within 0 to 1, got 1.5"):
        DistillOptions(label_weight=1.5).validate()


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
    options = DistillOptions(steps=60, batch_size=4, seq_len=64, top_k=16, held_out=4, eval_every=20, patience=5,
                             label_weight=0.0)
    student, cache, train, held = _student_and_teacher(tiny_bpe_llama, recovery_file, options, tmp_path)
    assert train.shape == (240, 64) and held.shape == (4, 64)
    before = [p.detach().clone() for p in student.model.embed_tokens.parameters()]
    untrained = copy.deepcopy(student)
    result = distill(student, cache, options, tmp_path / "ckpt.pt")
    assert result.steps == 60 and result.resumed_from == 0 and result.kept_step == 60
    assert result.held_out_loss[-1] < 0.95 * result.held_out_loss[0], result.held_out_loss
    assert sorted(result.held_out_loss, reverse=True) == result.held_out_loss  # better at every measurement
    assert all(torch.equal(a, b) for a, b in zip(before, student.model.embed_tokens.parameters()))  # head stays
    # the finished run's checkpoint makes the same call on the same student return at once, with the same weights
    again = distill(untrained, cache, options, tmp_path / "ckpt.pt")
    trained = dict(student.named_parameters())
    assert again.resumed_from == 60 and all(torch.equal(trained[n], p) for n, p in untrained.named_parameters())


def test_recovery_with_labels_fits_the_held_out_windows_own_next_tokens(tiny_bpe_llama, recovery_file, tmp_path):
    """The label share trains on the text itself: against a random teacher, which knows nothing of it, the student's
    cross-entropy on held-out windows of the text falls all the same."""
    options = DistillOptions(steps=40, batch_size=4, seq_len=64, top_k=16, held_out=4, eval_every=20, patience=5,
                             label_weight=1.0, learning_rate=1e-3)
    student, cache, _, held = _student_and_teacher(tiny_bpe_llama, recovery_file, options, tmp_path)

    def held_out_nll() -> float:
        with torch.no_grad():
            return float(student(held, labels=held, use_cache=False).loss)

    before = held_out_nll()
    distill(student, cache, dataclasses.replace(options, patience=99), tmp_path / "ckpt.pt")
    assert held_out_nll() < 0.9 * before


def test_low_rank_recovery_is_merged_into_a_student_of_the_same_shape(tiny_bpe_llama, recovery_file, tmp_path):
    """Adapters train, then fold into the projections: the student ends with the parameters it started with, each
    of the same shape, and closer to its teacher; a resumed call returns the same weights."""
    options = DistillOptions(steps=60, batch_size=4, seq_len=64, top_k=16, held_out=4, eval_every=20, patience=5,
                             lora_rank=8, learning_rate=1e-3, label_weight=0.0)
    student, cache, _, _ = _student_and_teacher(tiny_bpe_llama, recovery_file, options, tmp_path)
    untrained = copy.deepcopy(student)
    other = copy.deepcopy(student)  # the same shapes and norms, another projection: the adapters saved do not fit it
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    shapes = {n: p.shape for n, p in student.state_dict().items()}
    result = distill(student, cache, options, tmp_path / "ckpt.pt")
    assert {n: p.shape for n, p in student.state_dict().items()} == shapes
    assert result.held_out_loss[-1] < 0.95 * result.held_out_loss[0], result.held_out_loss
    start = dict(untrained.named_parameters())
    changed = {n for n, p in student.named_parameters() if not torch.equal(start[n], p)}
    assert "model.layers.0.mlp.down_proj.weight" in changed and "model.embed_tokens.weight" not in changed
    again = distill(untrained, cache, options, tmp_path / "ckpt.pt")
    trained = dict(student.named_parameters())
    assert again.resumed_from == 60 and all(torch.allclose(trained[n], p) for n, p in untrained.named_parameters())
    assert distill(other, cache, options, tmp_path / "ckpt.pt").resumed_from == 0


def test_export_with_distill_rank_ships_merged_weights_in_the_pruned_shape(tiny_bpe_llama, recovery_file, tmp_path):
    """--distill-rank trains adapters at their own rate; the GGUF holds only the model's own tensors (the converter
    refuses any it does not map, by name), in the shape plain pruning gives."""
    args = [str(tiny_bpe_llama), "--profile", "x86-laptop-16gb", "--quant", "Q8_0", "--ffn", "0.5",
            "--recovery-text", str(recovery_file), "--eval-chunks", "1", "--eval-fixed", "--eval-ctx", "128"]
    result = run_cli("export", *args, "--distill-steps", "20", "--distill-rank", "4", "--out", str(tmp_path / "lora"),
                     timeout=900)
    report = json.loads((tmp_path / "lora" / "report.json").read_text())
    assert result.returncode == (0 if report["validation"]["passed"] else 1), result.stderr[-3000:]
    distillation = report["export"]["pruning"]["distillation"]
    assert distillation["options"]["lora_rank"] == 4 and distillation["options"]["learning_rate"] == 1e-3
    assert distillation["steps"][0]["steps"] >= 1
    plain = run_cli("export", *args, "--distill-steps", "1", "--out", str(tmp_path / "plain"), timeout=900)
    assert plain.returncode in (0, 1), plain.stderr[-3000:]
    plain_layers = json.loads((tmp_path / "plain" / "report.json").read_text())["export"]["pruning"]["layers"]
    assert report["export"]["pruning"]["layers"] == plain_layers


def test_a_merged_adapter_computes_what_the_adapter_did():
    from edgeprune.build.pruning.distill import LowRankAdapter

    torch.manual_seed(0)
    adapter = LowRankAdapter(torch.nn.Linear(12, 7, bias=False), 3, torch.Generator().manual_seed(1))
    torch.nn.init.normal_(adapter.lora_b)
    x = torch.randn(5, 12)
    with torch.no_grad():
        adapted = adapter(x)
        assert not torch.allclose(adapted, adapter.base(x))
        assert torch.allclose(adapter.merge()(x), adapted, atol=1e-5)


def test_a_run_that_only_hurts_ends_with_the_weights_of_its_best_measurement(tiny_bpe_llama, recovery_file, tmp_path):
    """A learning rate far too high: every held-out measurement after the first is worse, so the student ends with
    the weights it started from, and the best-weights file is gone."""
    options = DistillOptions(steps=40, batch_size=4, seq_len=64, top_k=16, held_out=4, eval_every=20, patience=5,
                             learning_rate=0.05, label_weight=0.0)
    student, cache, _, _ = _student_and_teacher(tiny_bpe_llama, recovery_file, options, tmp_path)
    untrained = copy.deepcopy(student)
    result = distill(student, cache, options, tmp_path / "ckpt.pt")
    assert result.steps == 40 and min(result.held_out_loss[1:]) > result.held_out_loss[0], result.held_out_loss
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
            "--eval-chunks", "1", "--eval-fixed", "--eval-ctx", "128"]
    whole = run_cli("export", *args, "--out", str(tmp_path / "whole"), timeout=900)
    verdict = json.loads((tmp_path / "whole" / "report.json").read_text())["validation"]["passed"]
    assert whole.returncode == (0 if verdict else 1), whole.stderr[-3000:]
    assert "pruning step 2/2 done" in whole.stderr and "distillation: held-out loss" in whole.stderr

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
                     "--recovery-minutes", "5", "--recovery-text", str(recovery_file), "--eval-chunks", "1", "--eval-fixed",
                     "--eval-ctx", "128", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]  # the plan meets the file budget; speed is predicted
    plan_line = next(line for line in result.stderr.splitlines() if "] plan: " in line)
    assert "+ distillation" in plan_line and "distillation: held-out loss" in result.stderr
    export = json.loads((out / "report.json").read_text())["export"]
    assert export["plan"]["chosen"]["recovered"] and export["plan"]["chosen"]["recovery_minutes"] < 5
    distillation = export["pruning"]["distillation"]
    assert distillation["options"]["steps"] == DistillOptions().steps and distillation["steps"][0]["steps"] >= 1
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
                    '[evaluation]\ncontext = 128\nchunks = 1\nfixed = true\n'
                    '[[targets]]\nname = "a"\nprofile = "tight.toml"\nrecovery_minutes = 5\n'
                    '[[targets]]\nname = "b"\nprofile = "tight.toml"\nrecovery_minutes = 5\ncontext_length = 128\n')
    said: list[str] = []
    result = run_build(load_build_file(path), progress=said.append)
    assert [o.status for o in result.targets] == ["built", "built"], [o.error for o in result.targets]
    assert all("+ distillation" in o.entry["plan"] for o in result.targets)
    teacher_lines = [line for line in said if "distillation: teacher top-" in line]
    assert teacher_lines and all(line.startswith("[a 1/2]") for line in teacher_lines)
    assert any(line.startswith("[b 2/2] distillation: held-out loss") for line in said)

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


def test_a_recovery_that_cannot_fit_its_budget_is_refused_before_any_training(tiny_bpe_llama, recovery_file, tmp_path):
    """The planner's recovered cut with far more distillation steps than its recovery budget allows here: refused,
    timed on this machine, before the teacher's pass or any step (the CLI turns it into one line and exit 1)."""
    import dataclasses

    from converters import ConversionInput
    from edgeprune.build.pipeline.export import export_model
    from edgeprune.build.pipeline.options import ExportOptions
    from edgeprune.build.sizing import estimate_size
    from edgeprune.core.errors import EdgepruneError
    from edgeprune.core.shapes import shape_of
    from edgeprune.device.profiles import load_profile

    loaded = load_model(tiny_bpe_llama)
    q4 = estimate_size(ConversionInput(loaded.model, loaded.vocab, "tiny", 256), shape_of(loaded.model),
                       "Q4_0").file_bytes / (1 << 20)
    base = load_profile("x86-laptop-16gb")
    profile = dataclasses.replace(base, budgets=dataclasses.replace(
        base.budgets, context_length=256, max_file_mib=q4 * 0.97, recovery_minutes=5))
    said: list[str] = []
    options = ExportOptions(eval_ctx=128, eval_chunks=1, eval_precision=None, recovery_text=recovery_file,
                            distill=DistillOptions(steps=10_000_000))
    with pytest.raises(EdgepruneError) as refused:
        export_model(tiny_bpe_llama, profile, tmp_path / "out", options, said.append)
    message = str(refused.value)
    assert "\n" not in message and "recovery by distillation would take about" in message, message
    assert "over its budget of 5 min" in message and "10000000 steps of" in message and "--recovery-minutes" in message
    assert not any("distillation: teacher top-" in line or "distillation: step" in line for line in said)


def test_timing_a_recovery_leaves_the_teacher_as_it_was(tiny_bpe_llama):
    from edgeprune.build.pruning.distill import estimate

    model = load_model(tiny_bpe_llama).model
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    timed = estimate(model, DistillOptions(steps=40, batch_size=2, seq_len=32), rounds=3)
    assert timed.steps == 120 and timed.teacher_seconds > 0 and timed.seconds_per_step > 0
    assert timed.minutes == pytest.approx((timed.teacher_seconds + 120 * timed.seconds_per_step) / 60)
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name][0]) and parameter.requires_grad == before[name][1]
        assert parameter.grad is None
    timed.check(timed.minutes * 1.01)
    with pytest.raises(Exception, match=r"would take about .* over its budget of 1e-06 min"):
        timed.check(1e-6)


def test_no_recovery_window_shares_a_passage_with_either_held_out_text(smollm2_gguf):
    """Every training and held-out window of the default recovery, as the tokenizer gives it back, against the odd
    reference topics and The Tempest: no run of SHARED_RUN (64) characters in common. The even reference topics
    as they stand would fail (they repeat the odd ones' passages)."""
    from edgeprune.core.texts import (SHARED_RUN, default_evaluation_text, recovery_texts, tempest_text,
                                      without_shared_passages)

    tokenizer = load_model(smollm2_gguf).tokenizer
    held_out = [default_evaluation_text().content, tempest_text().content]
    runs = {text[i:i + SHARED_RUN] for text in held_out for i in range(len(text) - SHARED_RUN + 1)}
    options = DistillOptions()
    train, held = windows(recovery_texts(), tokenizer, options, None)
    assert len(train) + len(held) == options.steps * options.batch_size + options.held_out
    for row in torch.cat([train, held]).tolist():
        text = tokenizer.decode(row)
        assert len(text) > 2 * SHARED_RUN
        shared = next((text[i:i + SHARED_RUN] for i in range(len(text) - SHARED_RUN + 1)
                       if text[i:i + SHARED_RUN] in runs), None)
        assert shared is None, shared
    even = default_calibration_text().content
    assert any(even[i:i + SHARED_RUN] in runs for i in range(len(even) - SHARED_RUN + 1))
    kept = without_shared_passages(even, held_out[0])
    assert 0.5 * len(even) < len(kept) < len(even)


def test_a_paragraph_sharing_a_long_run_with_held_out_text_is_dropped_even_across_a_seam():
    from edgeprune.core.texts import SHARED_RUN, without_shared_passages

    secret = "x" * 10 + "".join(chr(97 + i % 26) for i in range(SHARED_RUN)) + "y" * 10
    held_out = "before " + secret + " after"
    clean, other = "a clean paragraph " * 5, "another one " * 8
    assert without_shared_passages(f"{clean}\n\n{secret}\n\n{other}", held_out) == f"{clean}\n\n{other}"
    # two paragraphs too short for a run alone, one across their seam: the one holding its middle goes
    seam = f"{clean}\n\n{secret[:40]}\n\n{secret[40:]}\n\n{other}"
    assert without_shared_passages(seam, secret[:40] + "\n\n" + secret[40:]) == f"{clean}\n\n{secret[40:]}\n\n{other}"
