"""validate.py against the real llama.cpp and the real SmolLM2-135M GGUF: no mocks, a few small chunks."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
from conftest import llama_cpp_logits, run_cli

from edgeprune.device.costmodel import kv_cache_bytes, predict_gguf, prefill_seconds_per_token, size_of_gguf
from edgeprune.core.errors import EdgepruneError
from edgeprune.device.gguf_check import read_gguf
from edgeprune.device.profile_writing import profile_to_toml
from edgeprune.device.profiles import load_profile
from edgeprune.core.shapes import shape_from_gguf
from edgeprune.core.texts import Text
from edgeprune.device.llamacpp.child import _death_error
from edgeprune.device.llamacpp.runtime import AMX_FIX, Runtime
from edgeprune.device.validation.budgets import check_budgets
from edgeprune.device.validation.entry import validate_gguf
from edgeprune.device.validation.quality import divergence_rows, log_softmax, token_logprobs
from edgeprune.device.validation.report import format_summary, write_report
from edgeprune.device.validation.results import MIB, ValidationReport
from edgeprune.device.validation.speed import REPETITIONS

CONTEXT = 256
LOOSE = SimpleNamespace(memory_mib=4096, context_length=CONTEXT, min_decode_tps=0.1, max_ttft_s=600.0,
                        ttft_prompt_tokens=64, max_file_mib=1024)
LAPTOP = load_profile("x86-laptop-16gb")
LOOSE_PROFILE = dataclasses.replace(LAPTOP, budgets=dataclasses.replace(LAPTOP.budgets, **vars(LOOSE)))
TIGHT = SimpleNamespace(memory_mib=1, context_length=CONTEXT, min_decode_tps=1e6, max_ttft_s=1e-6,
                        ttft_prompt_tokens=64, max_file_mib=1)


@pytest.fixture(scope="module")
def requantized(smollm2_gguf, tmp_path_factory):
    """SmolLM2 requantized from Q4_1 to Q4_0 by llama.cpp: the same tokenizer, other weights, so that KL divergence
    against it is measurably above zero."""
    import ctypes

    import llama_cpp

    path = tmp_path_factory.mktemp("requantized") / "smollm2-q4_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, True, 1
    assert llama_cpp.llama_model_quantize(str(smollm2_gguf).encode(), str(path).encode(), ctypes.byref(params)) == 0
    return path


@pytest.fixture(scope="module")
def validated(smollm2_gguf, requantized):
    """One validation of SmolLM2 against its Q4_0 requantization, shared below: every llama.cpp run costs seconds
    on 2 cores.

    One thread: on a busy shared 2-core machine, two OpenMP threads run twice as slow as one.
    """
    lines: list[str] = []
    report = validate_gguf(smollm2_gguf, reference_gguf=requantized, n_ctx=CONTEXT, max_chunks=4, threads=1,
                           profile=LOOSE_PROFILE, on_device=True, progress=lines.append)
    return report, lines


@pytest.fixture(scope="module")
def recomputed(smollm2_gguf, requantized):
    """Per scored token, worked out here as llama-perplexity does (chunks of the evaluation text, BOS first where
    the vocabulary asks for it, the second half scored) from llama.cpp's full logits through the high-level Llama
    API: the file's NLL, KL(reference || file), whether both pick the same top token, and Δp of the next token."""
    from llama_cpp import Llama

    from edgeprune.core.texts import default_evaluation_text

    llm = Llama(str(smollm2_gguf), n_ctx=CONTEXT, vocab_only=True, verbose=False)
    tokens = llm.tokenize(default_evaluation_text().content.encode(), add_bos=True)
    assert tokens[0] != llm.token_bos()  # SmolLM2's vocab asks for no BOS, so no chunk's first token is replaced
    scored = slice(CONTEXT // 2, CONTEXT - 1)
    stats: dict[str, list] = {"nll": [], "reference_nll": [], "kld": [], "same_top": [], "delta_p": []}
    for i in range(4):
        chunk = tokens[i * CONTEXT:(i + 1) * CONTEXT]
        targets = np.array(chunk[CONTEXT // 2 + 1:])
        q = log_softmax(llama_cpp_logits(smollm2_gguf, chunk, n_ctx=CONTEXT)[scored])
        p = log_softmax(llama_cpp_logits(requantized, chunk, n_ctx=CONTEXT)[scored])
        rows = np.arange(len(targets))
        stats["nll"] += list(-q[rows, targets])
        stats["reference_nll"] += list(-p[rows, targets])
        stats["kld"] += list((np.exp(p) * (p - q)).sum(axis=1))
        stats["same_top"] += list(p.argmax(axis=1) == q.argmax(axis=1))
        stats["delta_p"] += list(np.exp(q[rows, targets]) - np.exp(p[rows, targets]))
    return {key: np.array(values) for key, values in stats.items()}


def test_perplexity_is_llama_perplexity_style_and_sane(validated, recomputed):
    """Recomputed independently: llama.cpp's logits through the high-level Llama API, chunks with BOS first and the
    second half scored, as llama-perplexity does."""
    ppl = validated[0].perplexity
    assert (ppl.n_chunks, ppl.n_ctx) == (4, CONTEXT)
    assert ppl.n_tokens_scored == 4 * (CONTEXT - 1 - CONTEXT // 2) == len(recomputed["nll"])
    assert ppl.ppl == pytest.approx(math.exp(recomputed["nll"].mean()), rel=2e-3)


def test_divergence_against_another_file_matches_an_independent_computation(validated, recomputed):
    """Scored against a file with other weights, the KL divergence is well above zero (a validator that compared the
    file with itself, or summed nothing, would report 0) and equals the one worked out here from both files' full
    logits, as do its percentiles, the top-1 agreement and Δp."""
    report = validated[0]
    d, kld = report.divergence, recomputed["kld"]
    assert kld.mean() > 0.01  # Q4_1 against Q4_0 of the same weights: far above float noise
    assert d.kld_mean == pytest.approx(kld.mean(), rel=0.02)
    assert d.kld_median == pytest.approx(np.median(kld), rel=0.05)
    assert d.kld_p99 == pytest.approx(np.percentile(kld, 99), rel=0.05)
    assert d.top1_agreement == pytest.approx(recomputed["same_top"].mean(), abs=0.01)
    assert d.top1_agreement < 1.0
    assert d.delta_p_mean == pytest.approx(recomputed["delta_p"].mean(), abs=2e-3)
    assert d.n_tokens == report.perplexity.n_tokens_scored == len(kld)
    assert d.reference_ppl == pytest.approx(math.exp(recomputed["reference_nll"].mean()), rel=2e-3)


def decode_tps_timed_here(path, n_ctx: int, n_tokens: int = 32, tries: int = 3) -> float:
    """Tokens/s of one-token decodes timed here through llama-cpp-python's high-level API (one thread, as the
    validation ran), the best of a few tries: an independent clock for the validator's tg figure."""
    import time

    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=n_ctx, n_threads=1, n_threads_batch=1, verbose=False)
    best = 0.0
    for _ in range(tries):
        llm.reset()
        llm.eval([llm.token_eos()])
        start = time.perf_counter()
        for token in range(100, 100 + n_tokens):
            llm.eval([token])
        best = max(best, n_tokens / (time.perf_counter() - start))
    llm.close()
    return best


def test_speed_and_memory_are_measured(validated, smollm2_gguf):
    report, lines = validated
    speed, mem = report.speed, report.memory
    assert speed.ttft_prompt_tokens == 64 and speed.threads == 1
    # decode agrees with a clock read here (a validator that misreports its timing by 2x is outside this), a batched
    # prompt runs faster per token than one-token decodes (measured here, one thread on a busy machine: 72 against
    # 42 tok/s), and the first token of a 64-token prompt takes about what 64 tokens of prefill take
    assert 0.5 < speed.decode_tps / decode_tps_timed_here(smollm2_gguf, CONTEXT) < 1.5
    assert speed.prefill_tps > speed.decode_tps
    assert 0.5 < speed.ttft_s * speed.prefill_tps / 64 < 2.0
    assert sum("speed: repetition" in line for line in lines) == REPETITIONS
    assert mem.file_bytes == smollm2_gguf.stat().st_size
    assert 130e6 < mem.n_params < 140e6
    # llama.cpp's own KV buffer (logged in MiB with two decimals): 30 layers, 3 KV heads of 64, f16, 256 cells
    assert abs(mem.kv_cache_bytes - 30 * CONTEXT * (3 * 64 + 3 * 64) * 2) <= 0.01 * MIB
    assert mem.basis["kv_cache"].startswith("measured") and mem.basis["compute_buffer"].startswith("measured")
    assert (mem.kv_cache_type, mem.flash_attention) == ("f16", False)
    assert mem.compute_buffer_bytes > 0
    assert mem.total_bytes == mem.file_bytes + mem.kv_cache_bytes + mem.compute_buffer_bytes
    assert mem.peak_rss_bytes > mem.kv_cache_bytes


def test_runtime_follows_the_profile():
    import os

    phone = load_profile("snapdragon-8-gen-3-phone")
    assert Runtime.of(phone) == Runtime(1024, "q8_0", True, min(6, os.cpu_count()))  # never more threads than cores
    assert Runtime.of(phone, threads=3).threads == 3
    assert Runtime.of(None, threads=2, default_context=300) == Runtime(300, "f16", False, 2)


@pytest.mark.parametrize("name", ["snapdragon-8-gen-3-phone", "raspberry-pi-5-8gb"])
def test_memory_is_measured_in_the_profiles_runtime_and_matches_the_plan(smollm2_gguf, name):
    """The phone runs a q8_0 KV cache with flash attention, the Pi an f16 one without: validation creates exactly
    that context, measures llama.cpp's buffers, and the planner's prediction for the file agrees within 5%. Quality
    is scored with the phone's q8_0 cache too."""
    profile = load_profile(name)
    profile = dataclasses.replace(profile, budgets=dataclasses.replace(profile.budgets, ttft_prompt_tokens=64))
    report = validate_gguf(smollm2_gguf, eval_text=None, n_ctx=128, max_chunks=1, threads=1, profile=profile,
                           progress=lambda line: None)
    mem, rt = report.memory, profile.runtime
    assert (mem.kv_cache_type, mem.flash_attention, mem.context_length) == (
        rt.kv_cache_type, rt.flash_attention, profile.budgets.context_length)
    # quality is scored with the KV cache type, and with flash attention only where it needs it (the q8_0 cache)
    scored = report.perplexity
    assert (scored.kv_cache_type, scored.flash_attention) == (rt.kv_cache_type, rt.kv_cache_type == "q8_0")
    assert mem.basis["kv_cache"].startswith("measured")
    computed = kv_cache_bytes(shape_from_gguf(read_gguf(smollm2_gguf)), mem.context_length, rt.kv_cache_type,
                              rt.flash_attention)
    assert abs(mem.kv_cache_bytes - computed) <= 0.01 * MIB
    f16 = kv_cache_bytes(shape_from_gguf(read_gguf(smollm2_gguf)), mem.context_length)
    assert (mem.kv_cache_bytes < 0.6 * f16) == (rt.kv_cache_type == "q8_0")
    predicted = predict_gguf(read_gguf(smollm2_gguf), profile).memory_bytes
    assert mem.total_bytes == pytest.approx(predicted, rel=0.05)


def test_progress_is_reported(validated):
    lines = validated[1]
    assert any("perplexity chunk 4/4" in line for line in lines)
    assert any(line.startswith("speed") for line in lines)


def test_budgets_pass_when_loose_and_fail_when_impossible(validated):
    report = validated[0]
    assert report.passed is True
    assert {c.name for c in report.checks} == {"memory", "decode_tps", "ttft", "file_size"}
    tight = check_budgets(report.speed, report.memory, TIGHT)
    assert len(tight) == 4 and not any(c.passed for c in tight)
    no_file_limit = check_budgets(report.speed, report.memory, SimpleNamespace(**{**vars(LOOSE), "max_file_mib": None}))
    assert "file_size" not in {c.name for c in no_file_limit}


def test_summary_and_json_report_round_trip(validated, tmp_path):
    report = validated[0]
    summary = format_summary(report)
    d = report.divergence
    ppl = report.perplexity
    assert f"PPL         {ppl.ppl:.3f} ± {ppl.ppl_stderr:.3f}  (" in summary and f"(PPL {d.reference_ppl:.3f})" in summary
    assert "4 chunks of 256 tokens, a fixed count" in summary  # what decided the count
    assert f"KLD         mean {d.kld_mean:.5f} ± {d.kld_stderr:.5f}  median {d.kld_median:.5f}" in summary
    assert f"decode {report.speed.decode_tps:.1f} tok/s" in summary and "verdict     PASS" in summary
    assert len(summary.splitlines()) < 25
    out = tmp_path / "report.json"
    write_report(out, report, export=None)
    document = json.loads(out.read_text())
    assert document["schema_version"] == 1 and document["export"] is None
    assert document["validation"]["perplexity"]["ppl"] == report.perplexity.ppl
    assert ValidationReport.from_dict(document["validation"]) == report


def _truncated(path, tmp_path):
    out = tmp_path / "truncated.gguf"
    with open(path, "rb") as f:
        out.write_bytes(f.read(1 << 20))
    return out


@pytest.mark.parametrize("make", [
    _truncated,
    lambda path, tmp: tmp / "missing.gguf",
    lambda path, tmp: (tmp / "text.gguf").write_text("not a model") and tmp / "text.gguf",
])
def test_bad_files_fail_in_one_line_before_llama_cpp(smollm2_gguf, tmp_path, make):
    with pytest.raises(EdgepruneError) as err:
        validate_gguf(make(smollm2_gguf, tmp_path), progress=lambda line: None)
    assert "\n" not in str(err.value)


def test_too_short_text_fails_in_one_line(smollm2_gguf):
    with pytest.raises(EdgepruneError, match=r"has 3 tokens; 20 chunk\(s\) of 256 need 5120") as err:
        validate_gguf(smollm2_gguf, eval_text=Text("tiny", "Hello world."), n_ctx=CONTEXT, threads=1,
                      progress=lambda line: None)
    assert "\n" not in str(err.value)


def test_kv_cache_of_per_layer_deci_shapes(tmp_path):
    """Per-layer KV heads give per-layer K widths; V is padded to the widest layer (no flash attention)."""
    path = tmp_path / "deci-meta.gguf"
    writer = gguf.GGUFWriter(path, "deci")
    writer.add_block_count(3)
    writer.add_embedding_length(64)
    writer.add_head_count([4, 4, 0])
    writer.add_head_count_kv([2, 1, 0])
    writer.add_feed_forward_length([32, 32, 32])
    writer.add_key_length(16)
    writer.add_value_length(16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cells = 256  # 100 rounded up to llama.cpp's padding
    assert kv_cache_bytes(shape_from_gguf(read_gguf(path)), 100) == cells * (16 * (2 + 1 + 0) + 3 * 16 * 2) * 2


def test_log_softmax_and_divergence_math():
    ref = np.log(np.array([[0.5, 0.5, 1e-30], [0.7, 0.2, 0.1]], dtype=np.float32))
    cand = np.log(np.array([[0.9, 0.1, 1e-30], [0.7, 0.2, 0.1]], dtype=np.float32)) + 3.0  # a shift changes nothing
    assert np.allclose(np.exp(log_softmax(cand)).sum(axis=1), 1.0)
    targets = np.array([1, 0])
    assert np.allclose(token_logprobs(cand, targets), np.log([0.1, 0.7]), atol=1e-6)
    rows = divergence_rows(ref, cand, targets)
    assert np.allclose(rows["kld"], [0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1), 0.0], atol=1e-6)
    assert rows["same_top"].tolist() == [True, True]
    assert np.allclose(np.exp(rows["cand_logp"]) - np.exp(rows["ref_logp"]), [0.1 - 0.5, 0.0], atol=1e-6)


def test_native_crash_names_the_amx_bug_and_the_fix():
    message = str(_death_error(signal.SIGSEGV, "measuring the speed of m.gguf", []))
    assert "#20824" in message and AMX_FIX in message and "\n" not in message


def test_update_profile_makes_the_profile_predict_what_was_measured(smollm2_gguf, tmp_path):
    """`validate --on-device --update-profile` closes the loop: afterwards the profile's cost model predicts the
    speeds just measured, per-type tables included, and the fixed per-layer cost is kept."""
    device = dataclasses.replace(LAPTOP.device, decode_layer_overhead_us=50.0,
                                 decode_type_efficiency={"q4_1": 0.3, "q8_0": 0.5, "f32": 0.5},
                                 prefill_type_efficiency={"q4_1": 0.05, "q8_0": 0.1, "f32": 0.1, "f16": 0.1})
    path = tmp_path / "board.toml"
    path.write_text(profile_to_toml(dataclasses.replace(LAPTOP, device=device, budgets=LOOSE_PROFILE.budgets)))
    report_path = tmp_path / "report.json"
    written = tmp_path / "measured" / "board-measured.toml"
    before = path.read_text()
    result = run_cli("validate", str(smollm2_gguf), "--profile", str(path), "--on-device", "--update-profile",
                     str(written), "--threads", "1", "--eval-chunks", "1", "--eval-fixed", "--eval-ctx", "128", "--json", str(report_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "per-type tables" in result.stdout
    assert path.read_text() == before  # the profile it started from is left alone
    speed = json.loads(report_path.read_text())["validation"]["speed"]
    updated = load_profile(written)
    info = read_gguf(smollm2_gguf)
    assert predict_gguf(info, updated).decode_tps == pytest.approx(speed["decode_tps"], rel=0.01)
    prefill_s = prefill_seconds_per_token(size_of_gguf(info), shape_from_gguf(info), speed["n_prompt"], updated.device)
    assert 1 / prefill_s == pytest.approx(speed["prefill_tps"], rel=0.01)
    assert updated.device.decode_layer_overhead_us == 50.0
    ratio = updated.device.decode_type_efficiency["q4_1"] / updated.device.decode_type_efficiency["q8_0"]
    assert ratio == pytest.approx(0.6, rel=0.01)
