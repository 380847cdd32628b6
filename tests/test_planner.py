"""Cost model and planner: sizes must match what llama.cpp writes; plans must obey the budgets and explain."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest
from test_converters import shrink_layer

from converters import ConversionInput, write_gguf
from edgeprune.build.sizing import estimate_size
from edgeprune.device.costmodel import kv_cache_bytes, size_of_gguf
from edgeprune.core.errors import EdgepruneError
from edgeprune.device.gguf_check import read_gguf
from edgeprune.build.loading import load_model
from edgeprune.build.planner import SPEED_MARGIN, check_search_options, format_plan, load_quality_table, make_plan
from edgeprune.device.profiles import load_profile
from edgeprune.build.quantize import quantize_gguf
from edgeprune.build.search import SEARCH_CHUNKS, held_out_text, measured_plan
from edgeprune.core.shapes import shape_from_gguf, shape_of
from edgeprune.core.texts import default_calibration_text
from edgeprune.device.validation.quality import measure_perplexity

MIB = 1 << 20


@pytest.fixture
def tiny(tiny_bpe_llama):
    loaded = load_model(tiny_bpe_llama)
    return ConversionInput(loaded.model, loaded.vocab, "tiny", 256)


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M", "Q4_0", "F16"])
def test_predicted_size_and_types_match_the_quantized_file(tiny, tmp_path, quant):
    shrink_layer(tiny.model, 1, n_ff=64, n_groups=1)  # a deci model, with biases
    f16 = write_gguf(tiny, tmp_path / "f16.gguf")
    out = quantize_gguf(f16, tmp_path / "q.gguf", quant).path
    estimate = estimate_size(tiny, shape_of(tiny.model), quant)
    actual = size_of_gguf(read_gguf(out))
    assert {t.name: t.type_name for t in estimate.tensors} == {t.name: t.type_name for t in actual.tensors}
    assert abs(estimate.file_bytes - out.stat().st_size) / out.stat().st_size < 0.01


def test_shape_round_trips_through_gguf(tiny, tmp_path):
    shrink_layer(tiny.model, 2, n_ff=32, n_groups=1)
    path = write_gguf(tiny, tmp_path / "d.gguf")
    assert shape_from_gguf(read_gguf(path)) == shape_of(tiny.model)


def test_kv_cache_pads_v_without_flash_attention(tiny):
    shrink_layer(tiny.model, 1, n_ff=64, n_groups=1)
    shape = shape_of(tiny.model)  # KV heads per layer: 2, 1, 2 of 16 dims
    assert kv_cache_bytes(shape, 300) == 512 * (16 * 5 + 16 * 2 * 3) * 2
    assert kv_cache_bytes(shape, 300, flash_attention=True) == 512 * (16 * 5 * 2) * 2
    assert kv_cache_bytes(shape, 256, "q8_0", True) == int(256 * 16 * 5 * 2 * 34 / 32)


def budgeted(memory_mib=None, min_decode_tps=None, max_file_mib=None, **runtime):
    base = load_profile("x86-laptop-16gb")
    budgets = {k: v for k, v in dict(memory_mib=memory_mib, min_decode_tps=min_decode_tps).items() if v is not None}
    return dataclasses.replace(
        base, budgets=dataclasses.replace(base.budgets, context_length=256, max_file_mib=max_file_mib, **budgets),
        runtime=dataclasses.replace(base.runtime, **runtime))


def test_loose_budget_keeps_the_model_whole_at_the_best_quant(tiny):
    plan = make_plan(tiny, shape_of(tiny.model), budgeted())
    assert plan.chosen.candidate.quant == "F16" and plan.chosen.candidate.allocation == "none"
    assert plan.n_feasible == plan.n_candidates


def test_tight_file_budget_forces_quantization_then_pruning(tiny):
    shape = shape_of(tiny.model)
    f16 = estimate_size(tiny, shape, "F16").file_bytes / MIB
    q8 = estimate_size(tiny, shape, "Q8_0").file_bytes / MIB
    plan = make_plan(tiny, shape, budgeted(max_file_mib=(f16 + q8) / 2))
    assert plan.chosen.candidate.quant != "F16" and plan.chosen.prediction.size.file_bytes / MIB <= (f16 + q8) / 2
    assert any(v.budget == "file" for e in plan.rejected for v in e.violations)
    q4 = estimate_size(tiny, shape, "Q4_0").file_bytes / MIB
    pruned = make_plan(tiny, shape, budgeted(max_file_mib=q4 * 0.97))
    assert pruned.chosen.candidate.allocation != "none"
    assert pruned.chosen.prediction.size.file_bytes / MIB <= q4 * 0.97


def test_predicted_speed_must_beat_its_budget_by_the_margin(tiny):
    shape = shape_of(tiny.model)
    loose = make_plan(tiny, shape, budgeted())
    exactly = make_plan(tiny, shape, budgeted(min_decode_tps=loose.chosen.prediction.decode_tps))
    assert exactly.chosen.prediction.decode_tps >= loose.chosen.prediction.decode_tps * (1 + SPEED_MARGIN)
    broken = next(v for e in exactly.rejected for v in e.violations if v.budget == "decode")
    assert broken.limit == pytest.approx(loose.chosen.prediction.decode_tps * (1 + SPEED_MARGIN))
    assert "10% margin" in str(broken)


def test_runtime_without_deci_never_gets_adaptive(tiny):
    shape = shape_of(tiny.model)
    q4 = estimate_size(tiny, shape, "Q4_0").file_bytes / MIB
    plan = make_plan(tiny, shape, budgeted(max_file_mib=q4 * 0.97, allow_deci=False))
    assert plan.chosen.candidate.allocation == "uniform"


def test_mixed_candidates_are_ranked_by_their_measured_rows_only_when_asked(tiny):
    """A mix keeps a measured share of its named type's loss (mixed_table.toml), so asked for, the mix with the least
    estimated loss wins, priced as its named type; not asked for, no mix is offered. A type without a measured mix
    row gets its named type's estimate, marked extrapolated, and the mix is preferred on that tie."""
    shape = shape_of(tiny.model)
    quants = ("Q4_K_M", "Q4_0")
    named = make_plan(tiny, shape, budgeted(), quants=quants)
    assert named.chosen.candidate.label(shape) == "Q4_K_M"
    assert not any(e.candidate.mixed for e in [named.chosen, *named.rejected, *named.runners_up])
    mixed = make_plan(tiny, shape, budgeted(), quants=quants, mixed=True)
    shares = load_quality_table()["mixed"]["mix"]
    alone = {q: make_plan(tiny, shape, budgeted(), quants=(q,)).chosen for q in quants}
    best = min(quants, key=lambda q: alone[q].quality_loss * shares[q])
    assert mixed.chosen.candidate.label(shape) == f"{best} mixed" and mixed.chosen.basis == "measured"
    assert mixed.chosen.quality_loss < named.chosen.quality_loss
    assert mixed.chosen.prediction.size.file_bytes == alone[best].prediction.size.file_bytes
    assert mixed.chosen.quality_loss == pytest.approx(alone[best].quality_loss * shares[best])
    text = format_plan(mixed, "tiny", budgeted())
    assert f"chosen     {best} mixed" in text and "mixed: each tensor gets" in mixed.why()
    no_row = make_plan(tiny, shape, budgeted(), quants=("Q5_K_M",), mixed=True)
    assert no_row.chosen.candidate.label(shape) == "Q5_K_M mixed" and no_row.chosen.estimate.endswith("!")
    q5 = make_plan(tiny, shape, budgeted(), quants=("Q5_K_M",))
    assert no_row.chosen.quality_loss == q5.chosen.quality_loss


def test_a_recovery_budget_adds_recovered_candidates_that_must_fit_it(tiny):
    """With recovery_minutes the pruned candidates also come recovered by distillation, ranked by
    recovery_table.toml's rows (less lossy than the same cut without recovery) and priced in minutes; without it,
    or where the export cannot recover, none is offered; a budget too short for the estimate rejects them by name."""
    shape = shape_of(tiny.model)
    q4 = estimate_size(tiny, shape, "Q4_0").file_bytes / MIB
    tight = budgeted(max_file_mib=q4 * 0.97)
    plain = make_plan(tiny, shape, tight)
    assert not any(e.candidate.recovered for e in [plain.chosen, *plain.rejected, *plain.runners_up])

    def with_recovery(minutes):
        return dataclasses.replace(tight, budgets=dataclasses.replace(tight.budgets, recovery_minutes=minutes))

    recovered = make_plan(tiny, shape, with_recovery(15))
    chosen = recovered.chosen
    assert chosen.candidate.recovered and chosen.candidate.allocation == "uniform"
    assert chosen.quality_loss < plain.chosen.quality_loss
    assert chosen.prediction.size.file_bytes / MIB <= q4 * 0.97
    assert 0 < chosen.recovery_minutes < 1  # a tiny model's recovery, timed on this machine
    assert recovered.recovery_basis == "timed on this machine" and "min timed on this machine" in recovered.why()
    assert "+ distillation" in chosen.candidate.label(shape) and "recovered by distillation" in recovered.why()
    assert "recovery <= 15 min" in format_plan(recovered, "tiny", with_recovery(15))
    assert make_plan(tiny, shape, with_recovery(15), can_recover=False).chosen.candidate == plain.chosen.candidate

    too_short = make_plan(tiny, shape, with_recovery(1e-6))
    assert not too_short.chosen.candidate.recovered
    assert any(str(v).startswith("recovery ") and v.unit == "min" for e in too_short.rejected for v in e.violations)
    with pytest.raises(EdgepruneError, match="--search measured builds candidates without recovery"):
        check_search_options("measured", False, with_recovery(15))


def test_impossible_budget_is_one_line_with_a_way_out(tiny):
    with pytest.raises(EdgepruneError) as err:
        make_plan(tiny, shape_of(tiny.model), budgeted(memory_mib=0.5))
    message = str(err.value)
    assert "\n" not in message and "no plan meets" in message and "memory" in message and "MiB" in message


def test_plan_text_fits_a_screen_and_json_carries_the_same(tiny_bpe_llama, tmp_path):
    def run(*extra):
        return subprocess.run([sys.executable, "-m", "edgeprune.cli", "plan", str(tiny_bpe_llama), "--profile",
                               "raspberry-pi-5-8gb", *extra], capture_output=True, text=True, timeout=300)

    text, as_json = run(), run("--json")
    assert text.returncode == 0 and as_json.returncode == 0, text.stderr[-2000:]
    lines = text.stdout.splitlines()
    assert len(lines) <= 24 and all(len(l) <= 160 for l in lines)
    data = json.loads(as_json.stdout)
    assert data["chosen"]["label"] in text.stdout and data["why"] in text.stdout
    assert data["profile"] == "raspberry-pi-5-8gb"


def test_measured_search_builds_the_best_few_and_keeps_the_one_llama_cpp_scores_best(tiny_bpe_llama, tmp_path):
    """The search builds the planner's three best feasible candidates, scores each with llama.cpp against the dense
    F16 model on the held-out tail of the calibration text, and keeps the lowest. On this tiny model the third
    (one query head per group removed) measures best although the table ranks FFN pruning first: the search must
    override the estimate, not echo it."""
    loaded = load_model(tiny_bpe_llama)
    source = ConversionInput(loaded.model, loaded.vocab, "tiny", 256)
    shape = shape_of(loaded.model)
    q4 = estimate_size(source, shape, "Q4_0").file_bytes / MIB
    profile = budgeted(max_file_mib=q4 * 0.97)  # pruning is needed
    plan = make_plan(source, shape, profile)
    contenders = [plan.chosen, *plan.runners_up][:3]
    assert all(e.candidate.allocation != "none" for e in contenders)
    calibration = default_calibration_text()
    tokens = loaded.tokenizer(calibration.content, add_special_tokens=False)["input_ids"]
    searched = measured_plan(plan, loaded, tokens, calibration, top=3, threads=2, progress=lambda _m: None)
    assert [m.label for m in searched.measured] == [e.candidate.label(shape) for e in contenders]
    assert [m.estimated_loss for m in searched.measured] == [e.quality_loss for e in contenders]

    # Every loss is log(PPL / dense PPL), the dense model scored here independently on the same held-out text.
    dense = write_gguf(source, tmp_path / "dense-F16.gguf", "F16")
    dense_ppl = measure_perplexity(dense, held_out_text(calibration), max_chunks=SEARCH_CHUNKS, threads=2,
                                   progress=lambda _m: None)[0].ppl
    for m in searched.measured:
        assert m.measured_loss == pytest.approx(math.log(m.ppl / dense_ppl), abs=1e-6), (m, dense_ppl)
        # A pruned, Q4_0 tiny model stays near its dense PPL (measured: +4.2% for FFN 96→64, -9.2% for one head per
        # group fewer); a candidate scored on other text, built from other weights or broken lands far outside.
        assert abs(m.measured_loss) < math.log(1.25), (m, dense_ppl)

    # Kept: the unique lowest measured loss, which is also the lowest PPL; the others follow as runners-up.
    by_loss = sorted(searched.measured, key=lambda m: m.measured_loss)
    assert [m.label for m in by_loss] == [m.label for m in sorted(searched.measured, key=lambda m: m.ppl)]
    best = by_loss[0]
    assert best.measured_loss < by_loss[1].measured_loss - 0.05, by_loss  # a clear winner, not a tie
    assert searched.chosen.candidate.label(shape) == best.label and searched.chosen.feasible
    assert best.label != plan.chosen.candidate.label(shape), "the search only echoed the planner's estimate"
    assert {e.candidate.label(shape) for e in searched.runners_up[:2]} == {m.label for m in by_loss[1:]}
    data = searched.to_dict()
    assert len(data["measured"]) == 3 and data["why"].startswith("lowest PPL measured by llama.cpp")
    assert data["chosen"]["label"] == best.label
    text = format_plan(searched, "tiny", profile)
    assert f"chosen     {best.label}" in text and "measured" in text
