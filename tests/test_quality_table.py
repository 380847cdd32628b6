"""The planner's quality table: every row a shipped profile can choose is measured, and `plan` says when an
estimate is not a measurement but lies between measured rows or beyond them."""

from __future__ import annotations

import pytest
from test_planner import budgeted, tiny  # noqa: F401 - tiny is a fixture

from edgeprune.build.sizing import estimate_size
from edgeprune.build.planner import (
    BASES, LEGEND, SUGGESTED_QUANTS, Candidate, estimated_loss, format_plan, load_quality_table, make_plan,
    recovery_minutes,
)
from edgeprune.device.profiles import list_profiles
from edgeprune.core.shapes import LayerShape, ModelShape, shape_of

MIB = 1 << 20
# SmolLM2-135M, the model the table was measured on (FACTS): 30 layers of 9 heads of 64 over 3 KV heads, FFN 1536.
SMOLLM2 = ModelShape(49152, 576, 64, (LayerShape(9, 3, 1536),) * 30, True)
# Gemma 3 270M: 18 layers of 4 heads of 256 over one KV head, FFN 2048, a 262k vocabulary
GEMMA3 = ModelShape(262144, 640, 256, (LayerShape(4, 1, 2048),) * 18, True)
ONE_BLOCK = 3 * 576 * 32 * 30 / SMOLLM2.decoder_params()  # 32 FFN channels in every layer, as a decoder share


@pytest.fixture(scope="module")
def table():
    return load_quality_table()


def test_table_has_what_the_planner_reads_and_says_how_it_was_measured(table):
    assert all(isinstance(v, float) for v in table["quant"].values()) and table["quant"]["F16"] == 0.0
    for allocation in ("uniform", "adaptive"):
        curve = table["pruning"][allocation]
        assert curve[0] == [0.0, 0.0] and all(len(p) == 2 for p in curve)
        assert [p[0] for p in curve] == sorted({p[0] for p in curve})  # strictly increasing shares
    assert table["pruning"]["heads_factor"] > 1 and table["pruning"]["per_layer_removed"] > 0
    assert table["measured"]["command"] == "python -m edgeprune.build.bench quality" and table["measured"]["date"]


def test_every_quant_a_profile_or_the_planner_can_choose_is_measured(table):
    choosable = {q for p in list_profiles() for q in p.runtime.quant_types} | set(SUGGESTED_QUANTS)
    assert choosable <= set(table["measured"]["quant"]) <= set(table["quant"])


def test_pruning_is_measured_at_10_20_30_and_50_percent_for_both_allocations(table):
    assert table["measured"]["pruning_targets"] == [0.1, 0.2, 0.3, 0.5]
    for allocation in ("uniform", "adaptive"):
        shares = [p[0] for p in table["pruning"][allocation][1:]]
        assert len(shares) == 4  # only measured points after the origin
        for share, target in zip(shares, [0.1, 0.2, 0.3, 0.5]):
            assert abs(share - target) <= ONE_BLOCK  # widths land on 32-channel blocks
    # a uniform point is a share of decoder parameters, as the planner computes it: whole 32-channel blocks
    for share, _ in table["pruning"]["uniform"][1:]:
        blocks = share / ONE_BLOCK
        assert blocks == pytest.approx(round(blocks), abs=1e-4)


def test_uniform_candidates_on_measured_widths_are_measured_and_others_are_not(table):
    share, loss = table["pruning"]["uniform"][-1]
    n_ff = 1536 - round(share / ONE_BLOCK) * 32
    assert estimated_loss(Candidate("Q8_0", n_ff, 3, 0, "uniform"), SMOLLM2, table) == (
        pytest.approx(table["quant"]["Q8_0"] + loss), "measured")
    assert estimated_loss(Candidate("Q8_0", n_ff + 32, 3, 0, "uniform"), SMOLLM2, table)[1] == "interpolated"
    assert estimated_loss(Candidate("Q8_0", n_ff - 32, 3, 0, "uniform"), SMOLLM2, table)[1] == "extrapolated"
    for quant in table["measured"]["quant"]:
        assert estimated_loss(Candidate(quant, 1536, 3, 0, "none"), SMOLLM2, table) == (table["quant"][quant], "measured")


def test_recovered_rows_are_measured_points_below_the_retraining_free_curve(table):
    """recovery_table.toml: measured shares (whole 32-channel blocks), each less lossy than the one-shot curve there,
    a recovered candidate on one of them measured, and a cost the planner can scale."""
    recovered, one_shot = table["recovery"]["recovered"]["uniform"], table["pruning"]["uniform"]
    assert recovered[0] == [0.0, 0.0] and [p[0] for p in recovered] == sorted({p[0] for p in recovered})
    for share, loss in recovered[1:]:
        assert round(share / ONE_BLOCK) == pytest.approx(share / ONE_BLOCK, abs=1e-4)
        assert 0 < loss < next(l for s, l in one_shot if s == pytest.approx(share))
    share, loss = recovered[1]
    n_ff = 1536 - round(share / ONE_BLOCK) * 32
    assert estimated_loss(Candidate("Q8_0", n_ff, 3, 0, "uniform", recovered=True), SMOLLM2, table) == (
        pytest.approx(table["quant"]["Q8_0"] + loss), "measured")
    cost = table["recovery"]["cost"]
    assert cost["steps"] > 0 and cost["seconds_per_step"] > 0 and cost["pass_params"] == SMOLLM2.pass_params()
    assert table["recovery"]["measured"]["command"] == "python -m edgeprune.build.bench recovery"


def test_recovery_is_priced_by_the_weights_a_token_passes_through_not_the_decoder_alone(table):
    """Gemma 3 270M's decoder is a little smaller than SmolLM2's, but its 262k-token head is 1.7× its decoder:
    distill.estimate timed its recovery at 1.82× SmolLM2's on one machine."""
    assert GEMMA3.decoder_params() < SMOLLM2.decoder_params()
    ratio = recovery_minutes(GEMMA3, table) / recovery_minutes(SMOLLM2, table)
    assert ratio == pytest.approx(1.99, abs=0.01)


def test_recovered_estimates_are_measured_only_on_the_model_recovery_was_measured_on(table):
    """recovery_table.toml is SmolLM2's: on Gemma 3 270M distillation widened the in-domain gap instead (bench
    recovery), so another model's recovered estimate is marked extrapolated, not passed off as measured."""
    share = table["recovery"]["recovered"]["uniform"][1][0]
    for shape, basis in ((SMOLLM2, "measured"), (GEMMA3, "extrapolated")):
        layer = shape.layers[0]
        n_ff = layer.n_ff - round(share * shape.decoder_params() / (3 * shape.hidden_size * shape.n_layers))
        every_head = layer.n_head // layer.n_head_kv
        assert estimated_loss(Candidate("Q8_0", n_ff, every_head, 0, "uniform", recovered=True), shape,
                              load_quality_table(shape))[1] == basis


# A tiny shape: 2 layers, hidden 64, 4 heads of 16 over 2 KV heads, FFN 128. 32 FFN channels are 1/6 of the
# decoder parameters, one query head per KV group 1/9.
TINY = ModelShape(100, 64, 16, (LayerShape(4, 2, 128),) * 2, True)
TABLE = {
    "quant": {"F16": 0.0, "Q8_0": 0.01, "Q6_K": 0.02},
    "pruning": {"uniform": [[0.0, 0.0], [1 / 6, 0.1], [1 / 3, 0.3]], "adaptive": [[0.0, 0.0], [1 / 3, 0.2]],
                "heads_factor": 5.0, "per_layer_removed": 0.5},
    "measured": {"quant": ["F16", "Q8_0"]},
}


@pytest.mark.parametrize("candidate, loss, basis", [
    (Candidate("Q8_0", 128, 2, 0, "none"), 0.01, "measured"),
    (Candidate("Q6_K", 128, 2, 0, "none"), 0.02, "interpolated"),  # in the table, not measured
    (Candidate("Q2_K", 128, 2, 0, "none"), 1.0, "extrapolated"),  # not in the table at all
    (Candidate("Q8_0", 96, 2, 0, "uniform"), 0.11, "measured"),  # on the 1/6 point
    (Candidate("F16", 64, 2, 0, "uniform"), 0.3, "measured"),  # on the 1/3 point
    (Candidate("Q8_0", 112, 2, 0, "uniform"), 0.06, "interpolated"),  # 1/12: between the origin and 1/6
    (Candidate("Q8_0", 80, 2, 0, "uniform"), 0.21, "interpolated"),  # 1/4: between 1/6 and 1/3
    (Candidate("Q6_K", 96, 2, 0, "uniform"), 0.12, "interpolated"),  # a measured point, an unmeasured type
    (Candidate("Q8_0", 32, 2, 0, "uniform"), 0.51, "extrapolated"),  # 1/2: past the last point
    (Candidate("Q8_0", 96, 2, 0, "adaptive"), 0.11, "interpolated"),  # the adaptive curve has no 1/6 point
    (Candidate("Q8_0", 128, 1, 0, "uniform"), 0.01 + 5.0 * 0.1 * 6 / 9, "extrapolated"),  # heads: estimated
    (Candidate("Q8_0", 128, 2, 1, "uniform"), 0.51, "extrapolated"),  # whole layers: estimated
])
def test_estimated_loss_says_what_it_rests_on(candidate, loss, basis):
    assert estimated_loss(candidate, TINY, TABLE) == (pytest.approx(loss), basis)


def test_plan_marks_estimates_that_are_not_measurements(tiny, table):  # noqa: F811 - the fixture
    shape = shape_of(tiny.model)
    loose = make_plan(tiny, shape, budgeted())  # F16, unpruned: a measured row, nothing to mark
    assert loose.chosen.basis == "measured" and loose.to_dict()["chosen"]["estimate_basis"] == "measured"
    assert LEGEND not in format_plan(loose, "tiny", budgeted())
    q4 = estimate_size(tiny, shape, "Q4_0").file_bytes / MIB
    profile = budgeted(max_file_mib=q4 * 0.97)  # pruning is needed, and heads or layers are among the rejected
    plan = make_plan(tiny, shape, profile)
    text, data = format_plan(plan, "tiny", profile), plan.to_dict()
    shown = [plan.chosen, *plan.rejected]
    for e, d in zip(shown, [data["chosen"], *data["rejected"]], strict=True):
        assert d["estimate_basis"] == e.basis == estimated_loss(e.candidate, shape, table)[1]
        assert e.estimate.endswith("%" + BASES[e.basis]) and f"est. PPL {e.estimate}" in text
    assert any(e.basis != "measured" for e in shown) and text.endswith(LEGEND)


def test_mix_rows_are_the_model_s_own_where_measured_else_the_default():
    """Each model measured by bench mixed ranks its mixes on its own rows, matched by shape; any other shape on
    [mix]'s (SmolLM2 off its grid)."""
    import tomllib
    from importlib import resources

    mixed = tomllib.loads(resources.files("edgeprune.build").joinpath("mixed_table.toml").read_text("utf-8"))
    assert mixed["measured"]["command"] == "python -m edgeprune.build.bench mixed"
    assert load_quality_table(SMOLLM2)["mixed"]["mix"] == mixed["mix"]
    other = ModelShape(1000, 256, 64, (LayerShape(4, 2, 512),) * 2, True)
    assert load_quality_table(other)["mixed"]["mix"] == mixed["mix"]
    for model in mixed.get("models", {}).values():
        vocab, width, layers = model["shape"]
        shape = ModelShape(vocab, width, 64, (LayerShape(4, 1, 2048),) * layers, True)
        assert load_quality_table(shape)["mixed"]["mix"] == model


def test_a_mixed_table_rerun_for_one_model_keeps_the_other_s_rows_as_written():
    """EDGEPRUNE_MIXED_MODELS=gemma3 rewrites Gemma's rows from its measurements and keeps [mix] line for line,
    the measurements in its comments included."""
    import math
    import tomllib

    from edgeprune.build.bench.mixed import MIXED_TABLE, mixed_table_toml

    previous = MIXED_TABLE.read_text(encoding="utf-8")
    rows = [{"model": "gemma3", "target": "Q4_0", "kind": kind, "ppl": ppl, "reference_ppl": 10.0, "mib": 200.0}
            for kind, ppl in (("named", 14.0), ("mix", 12.0))]
    written = mixed_table_toml(rows, {"gemma3": {"shape": [262144, 640, 18]}}, "2026-12-04", previous)
    mix = previous.split("[mix]\n")[1].split("\n\n")[0]
    assert f"[mix]\n{mix}\n\n[models.gemma3]\n" in written
    table = tomllib.loads(written)
    assert table["mix"] == tomllib.loads(previous)["mix"]
    assert table["models"]["gemma3"] == {"shape": [262144, 640, 18],
                                         "Q4_0": round(math.log(1.2) / math.log(1.4), 4)}
