"""The planner's frontier: exactly the candidates no other beats on file size, estimated quality, decode speed,
memory and TTFT together (ties kept), in `plan --json`, marked in `plan --frontier`, refused with `--search
measured`, and drawn on the report page and on a build's index page (a curve per target)."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import random
import re

import matplotlib.image
from matplotlib.colors import to_hex
import numpy as np
import pytest
from click.testing import CliRunner
from test_reporting import colour_pixels, table_rows

from converters import ConversionInput
from edgeprune.build import plots
from edgeprune.build.builds.buildfile import init_build_file, load_build_file
from edgeprune.build.builds.manifest import write_index
from edgeprune.build.frontier import Frontier, format_frontier, non_dominated, objectives
from edgeprune.build.loading import load_model
from edgeprune.build.planner import Candidate, Evaluated, make_plan
from edgeprune.cli import cli
from edgeprune.core.errors import EdgepruneError
from edgeprune.core.shapes import shape_of
from edgeprune.device.costmodel import Prediction, SizeEstimate
from edgeprune.device.profiles import load_profile
from edgeprune.device.reporting.page import write_report_pages

MIB = 1 << 20


def evaluated(name: str, file_mib: float, loss: float, decode: float, memory_mib: float, ttft: float) -> Evaluated:
    """A hand-made candidate with these five objectives (memory = file + KV cache)."""
    size = SizeEstimate(name, (), int(file_mib * MIB), "llama")
    prediction = Prediction(size, int((memory_mib - file_mib) * MIB), 0, decode, 2 * decode, ttft)
    return Evaluated(Candidate(name, 96, 2, 0, "none"), prediction, loss, "measured")


def brute_force(items: list[Evaluated]) -> list[Evaluated]:
    """The definition, pair by pair: kept unless another is ≤ on all five objectives and < on one."""
    def dominated(b):
        return any(all(x <= y for x, y in zip(objectives(a), objectives(b))) and objectives(a) != objectives(b)
                   for a in items)
    return [b for b in items if not dominated(b)]


def test_frontier_holds_exactly_the_non_dominated_candidates_ties_included():
    small = evaluated("small", 50, 0.30, 100, 120, 0.5)
    twin = evaluated("twin", 50, 0.30, 100, 120, 0.5)  # equal to `small` on all five: both kept
    good = evaluated("good", 90, 0.02, 80, 160, 0.7)  # the least lossy, but more memory than the next three
    fast = evaluated("fast", 95, 0.10, 130, 150, 0.8)  # bigger and lossier than `good`, but faster
    quick = evaluated("quick", 95, 0.10, 80, 150, 0.3)  # slower than `fast`, but sooner to the first token
    beaten = evaluated("beaten", 95, 0.10, 80, 150, 0.8)  # `fast` and `quick` each beat it on one, tie the rest
    worse = evaluated("worse", 60, 0.30, 100, 120, 0.5)  # `small` and `twin` beat it on size alone
    everyone = [beaten, good, worse, twin, fast, small, quick]
    budgets = load_profile("raspberry-pi-5-8gb").budgets
    frontier = Frontier.of(everyone, budgets)
    # smallest file first, ties in the order given
    assert [e.candidate.quant for e in frontier.members] == ["twin", "small", "good", "fast", "quick"]
    assert frontier.beater(beaten) in (fast, quick) and frontier.beater(worse) in (small, twin)
    assert frontier.beater(twin) is None and frontier.beater(quick) is None

    rng = random.Random(7)  # coarse values, so equal objectives and exact ties are common
    for _ in range(20):
        cloud = [evaluated(f"c{i}", *(rng.choice((1, 2, 3)) for _ in range(5))) for i in range(40)]
        assert {id(e) for e in Frontier.of(cloud, budgets).members} == {id(e) for e in brute_force(cloud)}
    assert non_dominated([(1, 2), (2, 1), (2, 2), (1, 2)], lambda p: p) == [(1, 2), (1, 2), (2, 1)]


@pytest.fixture
def tiny(tiny_bpe_llama):
    loaded = load_model(tiny_bpe_llama)
    return ConversionInput(loaded.model, loaded.vocab, "tiny", 256)


def squeezed(name: str, **budgets):
    """A shipped profile at the tiny model's context, with budgets replaced."""
    base = load_profile(name)
    return dataclasses.replace(base, budgets=dataclasses.replace(base.budgets, context_length=256, **budgets))


def test_a_real_plan_s_frontier_is_its_candidates_non_dominated_ones_with_the_budgets_and_the_choice(tiny):
    """On the tiny model with a file budget between Q8_0 and F16: the members that break it are kept and say so,
    the chosen one is the least lossy member that meets the budgets, and nothing off the frontier beats a member."""
    shape = shape_of(tiny.model)
    loose = make_plan(tiny, shape, squeezed("x86-laptop-16gb"))
    sizes = sorted(e.prediction.size.file_bytes / MIB for e in loose.frontier.members)
    plan = make_plan(tiny, shape, squeezed("x86-laptop-16gb", max_file_mib=(sizes[-1] + sizes[-2]) / 2))
    members = plan.frontier.members
    assert any(not e.feasible for e in members) and any(e.feasible for e in members)
    assert plan.chosen is min((e for e in members if e.feasible), key=lambda e: e.quality_loss)
    assert plan.frontier.max_file_mib == plan.to_dict()["frontier"]["budgets"]["file_mib"]
    assert brute_force(members) == members  # no member beats another
    data = plan.to_dict()["frontier"]
    assert [m["chosen"] for m in data["members"]].count(True) == 1 and data["chosen_on_frontier"]
    assert [m["meets_budgets"] for m in data["members"]] == [not m["violations"] for m in data["members"]]


def test_a_chosen_candidate_off_the_frontier_is_named_with_what_beats_it(tiny):
    """A recovery budget too short for distillation: the chosen pruned candidate's recovered twin has its sizes and
    speeds and less loss, so it beats the chosen one on all five objectives, yet breaks the recovery budget (which
    the five do not weigh). The text and the JSON say so, and the chosen one is still the plan's choice."""
    shape = shape_of(tiny.model)
    q4 = make_plan(tiny, shape, squeezed("x86-laptop-16gb", max_file_mib=1e6), quants=("Q4_0",))
    profile = squeezed("x86-laptop-16gb", max_file_mib=0.97 * q4.chosen.prediction.size.file_bytes / MIB,
                       recovery_minutes=1e-6)
    plan = make_plan(tiny, shape, profile)
    twin = plan.frontier.beater(plan.chosen)
    assert twin is not None and twin.candidate == dataclasses.replace(plan.chosen.candidate, recovered=True)
    assert [v.budget for v in twin.violations] == ["recovery"] and not plan.to_dict()["frontier"]["chosen_on_frontier"]
    text = format_frontier(plan)
    assert (f"the chosen {plan.chosen.candidate.label(shape)} is off the frontier: {twin.candidate.label(shape)} "
            "beats it but breaks recovery") in text
    assert not any(line.startswith("* ") for line in text.splitlines())


def invoke(*args: str):
    return CliRunner().invoke(cli, ["plan", *args], catch_exceptions=True)


@pytest.mark.parametrize("flag", [["--frontier"], ["--frontier-plot", "f.png"]])
def test_frontier_with_measured_search_is_refused_in_one_line(tmp_path, flag):
    """Refused before the model is read: the path does not even exist."""
    result = invoke(str(tmp_path / "no-model"), "--profile", "raspberry-pi-5-8gb", "--search", "measured", *flag)
    assert isinstance(result.exception, EdgepruneError), result.output
    message = str(result.exception)
    assert "\n" not in message and f"{flag[0]} weighs every candidate on estimated quality" in message
    assert "use --search estimated, or drop" in message and not (tmp_path / "f.png").exists()


def test_plan_json_carries_the_frontier_and_the_text_marks_the_chosen_one(tiny_bpe_llama, tmp_path):
    as_json = invoke(str(tiny_bpe_llama), "--profile", "raspberry-pi-5-8gb", "--json")
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    frontier = data["frontier"]
    chosen = [m for m in frontier["members"] if m["chosen"]]
    assert chosen == [{**data["chosen"], "meets_budgets": True, "chosen": True}]
    assert frontier["budgets"] == {"memory_mib": 512.0, "file_mib": 256.0}  # raspberry-pi-5-8gb's

    plot = tmp_path / "plots" / "frontier.png"
    text = invoke(str(tiny_bpe_llama), "--profile", "raspberry-pi-5-8gb", "--frontier-plot", str(plot))
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("frontier")) + 1
    listed = lines[start:start + len(frontier["members"])]
    assert [line[2:].split("  ")[0] for line in listed] == [m["label"] for m in frontier["members"]]
    assert [line for line in listed if line.startswith("* ")] == [listed[frontier["members"].index(chosen[0])]]
    assert all("meets the budgets" in line for line in listed)
    assert plot.read_bytes().startswith(b"\x89PNG")

    plain = invoke(str(tiny_bpe_llama), "--profile", "raspberry-pi-5-8gb")
    assert "frontier" not in plain.stdout and plain.stdout.strip() in text.stdout


def frontier_image(page: str) -> np.ndarray:
    """The page's one frontier plot, decoded."""
    found = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="The candidates no other beats', page)
    assert len(found) == 1, "the page has no frontier plot, or more than one"
    return matplotlib.image.imread(io.BytesIO(base64.b64decode(found[0])), format="png")


def test_report_and_build_index_show_the_frontier_with_its_plot(tiny, tmp_path):
    """A build of two targets: each target's report.html has the frontier's table and plot, and the index page
    draws one curve per target (the plot's first two series colours), where a single plot has one."""
    shape = shape_of(tiny.model)
    plans = {name: make_plan(tiny, shape, squeezed(profile)).to_dict()
             for name, profile in (("pi5", "raspberry-pi-5-8gb"), ("laptop", "x86-laptop-16gb"))}
    build = load_build_file(init_build_file(tmp_path / "edgeprune.toml"))
    assert [t.name for t in build.targets] == list(plans)
    for name, plan in plans.items():
        document = {"export": {"model": "tiny", "profile": plan["profile"], "quant": plan["chosen"]["quant"],
                               "gguf": f"tiny-{name}.gguf", "plan": plan}, "validation": None}
        (build.out / name).mkdir(parents=True)
        (build.out / name / "report.json").write_text(json.dumps(document))
        write_report_pages(document, build.out / name, plots=plots)
        page = (build.out / name / "report.html").read_text()
        assert "<h2>Frontier (estimated by the planner)</h2>" in page
        single = frontier_image(page)
        assert colour_pixels(single, to_hex("C0")) > 200 and colour_pixels(single, to_hex("C1")) == 0
        rows = [row for row in table_rows(page) if len(row) == 8]  # the frontier's table
        assert [row[0] for row in rows[1:]] == [m["label"] for m in plan["frontier"]["members"]]
        chosen = [row for row in rows if row[-1] == "chosen"]
        assert len(chosen) == 1 and chosen[0][0] == plan["chosen"]["label"] and chosen[0][6] == "PASS"
    index = write_index(build.out, build)
    both = frontier_image(index.read_text())
    assert colour_pixels(both, to_hex("C0")) > 200 and colour_pixels(both, to_hex("C1")) > 200
