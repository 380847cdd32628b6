"""The planner: search pruning and quantization together against a device profile's budgets, and explain.

Every candidate (quant type × FFN width × heads per KV group × whole layers × allocation) is priced by the
cost model: exact tensor types and bytes from llama.cpp's dry run, KV cache, compute buffer, decode and
prefill speed on the profile's device. Candidates that break a budget are dropped; the rest are ranked by
estimated quality loss (edgeprune/build/quality_table.toml, measured by `python -m edgeprune.build.bench quality`), and the
least lossy one wins. Each estimate says whether it rests on measured rows or goes between or beyond them.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Callable

from converters import ConversionInput, per_layer_widths
from edgeprune.core.families import family_of

from edgeprune.build.frontier import Frontier, format_frontier
from edgeprune.build.sizing import estimate_size
from edgeprune.device.costmodel import Prediction, predict_for_size
from edgeprune.core.errors import EdgepruneError
from edgeprune.core.shapes import ModelShape

MIB = 1 << 20
LAYER_DROPS = (0, 2, 4)
FFN_STEPS = 6  # FFN widths tried, from the full width down to a third of it
SHOWN_REJECTED = 4
# Predicted speeds must beat their budgets by this much: the cost model's measured error on a calibrated host
# (python -m edgeprune.build.bench prediction) is about ±10%; memory is predicted to within 3%, from above.
SPEED_MARGIN = 0.10
RUNNERS_UP = 4  # feasible candidates kept after the chosen one, for `--search measured` to build and compare
SUGGESTED_QUANTS = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")
# What a quality estimate rests on, best first, with its mark in `plan`'s output: a planner that ranks on a guess
# must say so, so the user knows when `--search measured` is worth its minutes.
BASES = {"measured": "", "interpolated": "~", "extrapolated": "!"}
LEGEND = "est. ~ interpolated between measured rows of the quality table, ! extrapolated beyond them"
MEASURED_TOLERANCE = 1e-5  # the table's pruning shares are written to 6 decimals
UNMIXED = ("F32", "F16", "BF16")  # float outputs: a mix is quantized, and solved with the importance matrix


def k_quant(quant: str) -> bool:
    """K-quants and IQ4_XS use 256-wide blocks; a kept FFN width must be a multiple of 256 to use them."""
    return "_K" in quant or quant.startswith("IQ")


@dataclass(frozen=True)
class Candidate:
    quant: str
    n_ff: int  # kept FFN channels per layer (the per-layer average for adaptive allocation)
    heads_per_group: int  # kept query heads per KV group
    layers_removed: int
    allocation: str  # "uniform" exports as llama, "adaptive" as deci
    mixed: bool = False  # a type per tensor by sensitivity, in `quant`'s bytes (edgeprune.build.mixed)
    recovered: bool = False  # pruned, then recovered by distillation from the unpruned model (pruning.distill)

    def label(self, base: ModelShape) -> str:
        parts = [f"{self.quant} mixed" if self.mixed else self.quant]
        full = base.layers[0]
        if self.n_ff < full.n_ff:
            parts.append(f"FFN {full.n_ff}→{self.n_ff}")
        if self.heads_per_group < full.n_head // full.n_head_kv:
            parts.append(f"heads/group {full.n_head // full.n_head_kv}→{self.heads_per_group}")
        if self.layers_removed:
            parts.append(f"-{self.layers_removed} layers")
        if len(parts) > 1:
            parts.append(self.allocation)
        return ", ".join(parts) + (" + distillation" if self.recovered else "")

    def shape(self, base: ModelShape) -> ModelShape:
        """The uniform shape with the same widths: what sizes and speeds are priced on."""
        kv = base.layers[0].n_head_kv
        return dataclasses.replace(base, layers=tuple(  # the first layers' sliding pattern (which go is decided later)
            dataclasses.replace(layer, n_head=self.heads_per_group * kv, n_ff=self.n_ff)
            for layer in base.layers[:base.n_layers - self.layers_removed]))

    def prune_options(self, base: ModelShape):
        """The edgeprune.build.pruning options that build this candidate, or None when nothing is pruned."""
        if self.allocation == "none":
            return None
        from edgeprune.build.pruning import PruneOptions

        full = base.layers[0]
        d, hd = base.hidden_size, base.head_dim
        attention = d * hd * (2 * full.n_head + 2 * full.n_head_kv)
        removed_heads = (full.n_head - self.heads_per_group * full.n_head_kv) * 2 * d * hd
        return PruneOptions(heads=removed_heads / attention, ffn=1 - self.n_ff / full.n_ff, layers=self.layers_removed,
                            allocation=self.allocation, align=256 if k_quant(self.quant) else 32)


@dataclass(frozen=True)
class Violation:
    budget: str
    needed: float
    limit: float  # the budget, tightened by `margin` for predicted speeds
    unit: str
    margin: float = 0.0

    @property
    def excess(self) -> float:
        """How far past the limit, as a fraction of it (a speed below its minimum counts the same way)."""
        return self.needed / self.limit - 1 if self.budget not in ("decode",) else self.limit / self.needed - 1

    def __str__(self) -> str:
        op = "<" if self.budget == "decode" else ">"
        margin = f" (budget with {self.margin:.0%} margin)" if self.margin else ""
        return f"{self.budget} {self.needed:.4g} {self.unit} {op} {self.limit:.4g}{margin} (by {100 * self.excess:.0f}%)"


@dataclass
class Evaluated:
    candidate: Candidate
    prediction: Prediction
    quality_loss: float  # estimated Δ log PPL
    basis: str  # a key of BASES: how the quality table backs quality_loss
    violations: list[Violation] = field(default_factory=list)
    recovery_minutes: float | None = None  # estimated recovery time, for a recovered candidate (Plan.recovery_basis)

    @property
    def estimate(self) -> str:
        """The estimated PPL increase as `plan` prints it, marked unless it rests on measured rows."""
        return f"+{100 * (math.exp(self.quality_loss) - 1):.1f}%{BASES[self.basis]}"

    @property
    def feasible(self) -> bool:
        return not self.violations

    def to_dict(self, base: ModelShape) -> dict:
        p = self.prediction
        return {
            "label": self.candidate.label(base), **dataclasses.asdict(self.candidate),
            "architecture": p.size.architecture,
            "file_mib": round(p.size.file_bytes / MIB, 2), "memory_mib": round(p.memory_bytes / MIB, 2),
            "decode_tps": round(p.decode_tps, 2), "prefill_tps": round(p.prefill_tps, 2), "ttft_s": round(p.ttft_s, 3),
            "estimated_ppl_increase": round(100 * (math.exp(self.quality_loss) - 1), 1), "estimate_basis": self.basis,
            "recovery_minutes": None if self.recovery_minutes is None else round(self.recovery_minutes, 1),
            "violations": [str(v) for v in self.violations],
        }


@dataclass
class Plan:
    profile_name: str
    device: str
    base: ModelShape
    chosen: Evaluated
    rejected: list[Evaluated]  # the better-ranked or nearest candidates that break a budget
    n_candidates: int
    n_feasible: int
    frontier: Frontier  # every candidate no other beats on size, quality, speed, memory and TTFT together
    runners_up: list[Evaluated] = field(default_factory=list)  # the next feasible ones, least lossy first
    measured: list = field(default_factory=list)  # edgeprune.build.search.MeasuredLoss, after `--search measured`
    notes: tuple[str, ...] = ()  # what the family's architecture rules out, whose measurements the estimates are
    recovery_basis: str = ""  # where the recovered candidates' minutes come from (recovery_cost)

    def to_dict(self) -> dict:
        return {
            "profile": self.profile_name, "device": self.device, "candidates": self.n_candidates,
            "feasible": self.n_feasible, "chosen": self.chosen.to_dict(self.base),
            "why": self.why(), "rejected": [e.to_dict(self.base) for e in self.rejected],
            "measured": [dataclasses.asdict(m) for m in self.measured], "notes": list(self.notes),
            "frontier": self.frontier.to_dict(self.base, self.chosen),
        }

    def why(self) -> str:
        better = [e for e in self.rejected if e.quality_loss < self.chosen.quality_loss]
        if self.measured:
            reason = (f"lowest PPL measured by llama.cpp of the {len(self.measured)} least lossy of the "
                      f"{self.n_feasible} candidates (of {self.n_candidates}) that meet every budget")
        else:
            reason = (f"least estimated quality loss of the {self.n_feasible} candidates (of {self.n_candidates}) "
                      "that meet every budget")
        if better:
            reason += "; each less lossy one breaks a budget (below)"
        if self.chosen.candidate.recovered:
            reason += (f"; recovered by distillation from the unpruned model, about {self.chosen.recovery_minutes:.0f} "
                       f"min {self.recovery_basis}")
        if self.chosen.candidate.mixed:
            reason += (f"; mixed: each tensor gets the llama.cpp type that gives the least estimated KLD in all "
                       f"(its measured error per tensor and type, priced by kind in measured KLD), in "
                       f"{self.chosen.candidate.quant}'s bytes and the decode budget; export lists the types")
        return reason


# Each model's measured quality rows, the default (SmolLM2-135M's) first (`python -m edgeprune.build.bench quality`,
# `... quality-gemma3`)
QUALITY_TABLES = ("quality_table.toml", "quality_table_gemma3.toml")


def load_quality_table(base: ModelShape | None = None) -> dict:
    """The quality rows measured on `base`'s model where there are some (QUALITY_TABLES, matched by vocabulary,
    hidden size and layers), else SmolLM2's quality_table.toml (`python -m edgeprune.build.bench quality`), with
    the mixed-precision rows of mixed_table.toml (`python -m edgeprune.build.bench mixed`, the same model's where
    measured) under "mixed" and the
    recovered-pruning rows of recovery_table.toml (`python -m edgeprune.build.bench recovery`) under "recovery"."""
    package = resources.files("edgeprune.build")
    tables = [tomllib.loads(package.joinpath(name).read_text(encoding="utf-8")) for name in QUALITY_TABLES
              if package.joinpath(name).is_file()]
    shape = base.table_key if base is not None else None
    table = next((t for t in tables if t["measured"]["shape"] == shape), tables[0])
    mixed = tomllib.loads(package.joinpath("mixed_table.toml").read_text(encoding="utf-8"))
    mix = next((m for m in mixed.get("models", {}).values() if m["shape"] == shape), mixed["mix"])
    table["mixed"] = {**mixed, "mix": mix}
    table["recovery"] = tomllib.loads(package.joinpath("recovery_table.toml").read_text(encoding="utf-8"))
    return table


def recovery_minutes(base: ModelShape, table: dict) -> float:
    """Estimated minutes of recovery by distillation (the teacher's pass and the default steps): what it took on the
    machine that measured recovery_table.toml, scaled by the weights a token's pass multiplies by (decoder and
    output head). distill.estimate timed Gemma 3 270M's recovery at 1.82× SmolLM2's on one 2-core machine: these
    weights give 1.99×, decoder parameters alone 0.94×."""
    cost = table["recovery"]["cost"]
    seconds = cost["teacher_seconds"] + cost["steps"] * cost["seconds_per_step"]
    return seconds * base.pass_params() / cost["pass_params"] / 60


TIMED_HERE = "timed on this machine"
TABLE_MACHINE = ("on the 2-core machine that measured recovery_table.toml, scaled by the weights a token's pass "
                 "multiplies by (not timed here: the weights are not loaded)")


def recovery_cost(source: ConversionInput, base: ModelShape, table: dict,
                  progress: Callable[[str], None] | None = None) -> tuple[float, str]:
    """Minutes of recovery by distillation with the default steps, and where that figure comes from. With the
    weights in memory (an export), one teacher batch and one training step are timed on this machine, as the
    export's budget check times them: distill.estimate put SmolLM2's recovery at 37.6 min on a 2-core AVX2-only
    EPYC, where the table's minutes say 12.1, so a plan there chose a recovery its export then refused. Without
    them (`plan` from the shapes alone) the table's minutes, scaled, and said to be so."""
    model = source.model
    if model is None or next(model.parameters()).device.type == "meta":
        return recovery_minutes(base, table), TABLE_MACHINE
    from edgeprune.build.pruning.distill import DistillOptions, estimate

    if progress:
        progress("planning: timing a step of recovery by distillation on this machine")
    return estimate(model, DistillOptions()).minutes, TIMED_HERE


def estimated_loss(candidate: Candidate, base: ModelShape, table: dict) -> tuple[float, str]:
    """Δ log PPL from the quality table (quantization plus pruning, added in log space) and its basis: "measured"
    when every term is a measured row, else "interpolated" or "extrapolated" (see BASES). A mix without a
    measured row is counted at its named type's loss: the solve could keep the named type's own choice of types. A
    measured mix is its named type's loss times the share of it the mix kept where it was measured (mixed_table):
    a mix's gain carries over between models, its loss does not (SmolLM2's named rows sit on its Q4_1 grid)."""
    quant = table["quant"].get(candidate.quant)
    share = table["mixed"]["mix"].get(candidate.quant) if candidate.mixed else None
    if share is not None and quant is not None:
        quant *= share
        basis = "measured" if candidate.quant in table["measured"]["quant"] else "interpolated"
    elif quant is None:  # a type nobody measured: ranked below every measured one
        quant, basis = 1.0, "extrapolated"
    elif candidate.mixed:
        basis = "extrapolated"
    else:
        basis = "measured" if candidate.quant in table["measured"]["quant"] else "interpolated"
    if candidate.allocation == "none":
        return quant, basis
    pruning = table["pruning"]
    full = base.layers[0]
    d, hd = base.hidden_size, base.head_dim
    decoder = base.decoder_params()
    mlp_removed = 3 * d * (full.n_ff - candidate.n_ff) * (base.n_layers - candidate.layers_removed)
    heads_removed = 2 * d * hd * (full.n_head - candidate.heads_per_group * full.n_head_kv) * (base.n_layers - candidate.layers_removed)
    curves = table["recovery"]["recovered"] if candidate.recovered else pruning
    curve = curves[candidate.allocation]
    loss = _interpolate(curve, mlp_removed / decoder) + pruning["heads_factor"] * _interpolate(curve, heads_removed / decoder)
    bases = [basis, _curve_basis(curve, mlp_removed / decoder)]
    if heads_removed or candidate.layers_removed:  # heads_factor and per_layer_removed are estimates, not rows
        bases.append("extrapolated")
    if candidate.recovered and table["recovery"]["measured"]["shape"] != base.table_key:
        bases.append("extrapolated")  # recovery measured on another model: Gemma 3 270M's did not follow SmolLM2's
    return quant + loss + pruning["per_layer_removed"] * candidate.layers_removed, max(bases, key=list(BASES).index)


def _interpolate(points: list[list[float]], x: float) -> float:
    xs = [p[0] for p in points]
    i = min(max(bisect.bisect_right(xs, x), 1), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _curve_basis(points: list[list[float]], x: float) -> str:
    """A pruning curve holds only measured points (and the unpruned origin), so x is on one, between or beyond."""
    if any(math.isclose(x, p[0], abs_tol=MEASURED_TOLERANCE) for p in points):
        return "measured"
    return "interpolated" if x < points[-1][0] else "extrapolated"


def check_search_options(search: str, mixed: bool, profile=None) -> None:
    """`--search measured` builds and scores plain candidates: refused with what it cannot build."""
    if search != "measured":
        return
    if mixed:
        raise EdgepruneError("--search measured builds and scores named types only: drop --mix, or use --search "
                             "estimated to let the planner rank mixed candidates")
    if profile is not None and profile.budgets.recovery_minutes is not None:
        raise EdgepruneError(f"--search measured builds candidates without recovery, but profile {profile.name} "
                             "gives a recovery budget (recovery_minutes): use --search estimated, or drop "
                             "recovery_minutes")


def enumerate_candidates(base: ModelShape, quants: tuple[str, ...], allow_deci: bool, mixed: bool = False,
                         recovered: tuple[str, ...] = ()) -> list[Candidate]:
    """Every structure at every type; with `mixed`, each quantized one also as a mix in that type's bytes; each
    pruned one of an allocation in `recovered` also recovered by distillation."""
    full = base.layers[0]
    group = full.n_head // full.n_head_kv
    out = []
    for quant in quants:
        align = 256 if k_quant(quant) else 32
        step = max(align, (full.n_ff // 3 // FFN_STEPS) // align * align)
        widths = sorted({full.n_ff} | {w for w in range(full.n_ff // align * align, full.n_ff // 3, -step) if w > 0},
                        reverse=True)
        for n_ff in widths:
            for heads in sorted({group, max(1, group - 1)}, reverse=True):
                for layers in LAYER_DROPS:
                    if layers >= base.n_layers // 2:
                        continue
                    if n_ff == full.n_ff and heads == group and layers == 0:
                        out.append(Candidate(quant, n_ff, heads, 0, "none"))
                        continue
                    for allocation in ("uniform", "adaptive") if allow_deci else ("uniform",):
                        out.append(Candidate(quant, n_ff, heads, layers, allocation))
    out += [dataclasses.replace(c, recovered=True) for c in out if c.allocation in recovered]
    if mixed:
        out += [dataclasses.replace(c, mixed=True) for c in out if c.quant not in UNMIXED]
    return out


def allow_deci(source: ConversionInput, profile) -> bool:
    """Per-layer widths where the profile's runtime loads `deci` and the family has it (not Qwen3, Gemma 3)."""
    return profile.runtime.allow_deci and per_layer_widths(source.config)


def violations(prediction: Prediction, profile) -> list[Violation]:
    b = profile.budgets
    found = []
    if prediction.memory_bytes / MIB > b.memory_mib:
        found.append(Violation("memory", prediction.memory_bytes / MIB, b.memory_mib, "MiB"))
    if prediction.decode_tps < b.min_decode_tps * (1 + SPEED_MARGIN):
        found.append(Violation("decode", prediction.decode_tps, b.min_decode_tps * (1 + SPEED_MARGIN), "tok/s",
                               SPEED_MARGIN))
    if prediction.ttft_s > b.max_ttft_s / (1 + SPEED_MARGIN):
        found.append(Violation("ttft", prediction.ttft_s, b.max_ttft_s / (1 + SPEED_MARGIN), "s", SPEED_MARGIN))
    if b.max_file_mib is not None and prediction.size.file_bytes / MIB > b.max_file_mib:
        found.append(Violation("file", prediction.size.file_bytes / MIB, b.max_file_mib, "MiB"))
    return found


def evaluate(source: ConversionInput, base: ModelShape, candidates: list[Candidate], profile, table: dict,
             progress: Callable[[str], None] | None = None, minutes: float | None = None) -> list[Evaluated]:
    """Price and rank each candidate. A mix is priced as its named type: the solve keeps within that type's bytes,
    and within the profile's decode budget with the same margin (edgeprune.build.mixed.choose_mix). `minutes` is
    what recovering a recovered candidate takes (recovery_cost)."""
    sizes: dict = {}
    out = []
    budget = profile.budgets.recovery_minutes
    for i, c in enumerate(candidates):
        shape = c.shape(base)
        key = (c.quant, shape)
        if key not in sizes:
            if progress and len(sizes) % 20 == 0:
                progress(f"planning: pricing candidate {i + 1}/{len(candidates)} with llama.cpp's dry run")
            sizes[key] = estimate_size(source, shape, c.quant)
        prediction = predict_for_size(sizes[key], shape, profile)
        found = violations(prediction, profile)
        if c.recovered and minutes > budget:  # recovered candidates come only with a budget (make_plan)
            found.append(Violation("recovery", minutes, budget, "min"))
        out.append(Evaluated(c, prediction, *estimated_loss(c, base, table), found,
                             minutes if c.recovered else None))
    return out


def make_plan(source: ConversionInput, base: ModelShape, profile, *, quants: tuple[str, ...] | None = None,
              mixed: bool = False, can_recover: bool = True, progress: Callable[[str], None] | None = None) -> Plan:
    """The best candidate for `profile`, or a one-line error saying what the closest one misses and what would help.
    `mixed` adds mixed-precision candidates (edgeprune.build.mixed), preferred over their named type on equal estimates.
    A profile with a recovery budget adds recovered twins of the pruned ones, where the export `can_recover`."""
    table = load_quality_table(base)
    quants = quants or profile.runtime.quant_types
    recovered = tuple(table["recovery"]["recovered"]) if can_recover and profile.budgets.recovery_minutes else ()
    candidates = enumerate_candidates(base, quants, allow_deci(source, profile), mixed, recovered)
    minutes, basis = recovery_cost(source, base, table, progress) if recovered else (None, "")
    evaluated = evaluate(source, base, candidates, profile, table, progress, minutes)
    feasible = sorted((e for e in evaluated if e.feasible), key=lambda e: (e.quality_loss, not e.candidate.mixed))
    if not feasible:
        raise EdgepruneError(_impossible(source, base, evaluated, profile, table))
    chosen = feasible[0]
    infeasible = [e for e in evaluated if not e.feasible]
    better = sorted((e for e in infeasible if e.quality_loss < chosen.quality_loss), key=lambda e: -e.quality_loss)
    nearest = sorted((e for e in infeasible if e not in better), key=lambda e: sum(v.excess for v in e.violations))
    rejected = (better + nearest)[:SHOWN_REJECTED]
    return Plan(profile.name, profile.device.name, base, chosen, rejected, len(evaluated), len(feasible),
                Frontier.of(evaluated, profile.budgets), runners_up=feasible[1:1 + RUNNERS_UP],
                notes=plan_notes(source, base, profile, table), recovery_basis=basis)


def plan_notes(source: ConversionInput, base: ModelShape, profile, table: dict) -> tuple[str, ...]:
    """What the plan could not offer for this family, and the model whose measured rows the estimates are."""
    notes = []
    if profile.runtime.allow_deci and not allow_deci(source, profile):
        notes.append(f"uniform widths only: llama.cpp's {family_of(source.config).gguf_arch} loader creates every "
                     "layer at layer 0's widths, and no other architecture holds this family's norms")
    measured = table["measured"]
    if base.table_key != measured["shape"]:
        notes.append(f"quality estimates from {measured['model']}'s measured rows: the table has none for this model")
    return tuple(notes)


def _impossible(source, base, evaluated: list[Evaluated], profile, table) -> str:
    closest = min(evaluated, key=lambda e: (sum(v.excess for v in e.violations), e.quality_loss))
    missed = "; ".join(str(v) for v in closest.violations)
    hints = []
    others = tuple(q for q in SUGGESTED_QUANTS if q not in profile.runtime.quant_types)
    if others:
        extra = [e for e in evaluate(source, base, enumerate_candidates(base, others, allow_deci(source, profile)),
                                     profile, table) if e.feasible]
        if extra:
            best = min(extra, key=lambda e: e.quality_loss)
            hints.append(f"allow {best.candidate.quant} in the profile's quant_types ({best.candidate.label(base)} fits)")
    if any(v.budget == "memory" for v in closest.violations):
        p, b = closest.prediction, profile.budgets
        per_token = p.kv_cache_bytes / b.context_length
        room = b.memory_mib * MIB - (p.memory_bytes - p.kv_cache_bytes)
        if room > 0 and (ctx := int(room / per_token) // 256 * 256) >= 256:
            hints.append(f"shorten context_length to {ctx}")
    if not hints:
        hints.append("relax the budget or choose a smaller model")
    return (f"no plan meets {profile.name}: the closest, {closest.candidate.label(base)}, misses {missed}: "
            + " or ".join(hints))


def format_plan(plan: Plan, model_name: str, profile, frontier: bool = False) -> str:
    """One screen: budgets, the choice with its predictions and reason, and the nearest rejected candidates; with
    `frontier`, the frontier's members after them (edgeprune.build.frontier)."""
    b, c = profile.budgets, plan.chosen.to_dict(plan.base)
    file_budget = f", file <= {b.max_file_mib:g} MiB" if b.max_file_mib is not None else ""
    file_budget += f", recovery <= {b.recovery_minutes:g} min" if b.recovery_minutes is not None else ""
    lines = [
        f"plan for {model_name} on {plan.device} [{plan.profile_name}]",
        f"budgets    memory <= {b.memory_mib:g} MiB at ctx {b.context_length}, decode >= {b.min_decode_tps:g} tok/s, "
        f"TTFT <= {b.max_ttft_s:g} s for {b.ttft_prompt_tokens} tokens{file_budget}; speeds planned with a "
        f"{SPEED_MARGIN:.0%} margin",
        f"chosen     {c['label']}  ({c['architecture']} GGUF)",
        f"predicted  file {c['file_mib']:.1f} MiB, memory {c['memory_mib']:.1f} MiB, decode {c['decode_tps']:.1f} tok/s, "
        f"TTFT {c['ttft_s']:.2f} s, est. PPL {plan.chosen.estimate}",
        f"why        {plan.why()}",
    ] + [f"note       {note}" for note in plan.notes]
    if plan.measured:
        lines.append("measured   " + "; ".join(f"{m.label}: PPL +{100 * (math.exp(m.measured_loss) - 1):.1f}% "
                                              f"(est. +{100 * (math.exp(m.estimated_loss) - 1):.1f}%)"
                                              for m in plan.measured))
    lines.append("rejected:")
    if not plan.rejected:
        lines.append("  none: every candidate meets the budgets, so the least lossy one is chosen")
    for e in plan.rejected:
        lines.append(f"  {e.candidate.label(plan.base):<44} est. PPL {e.estimate:<7} breaks "
                     f"{'; '.join(map(str, e.violations))}")
    if frontier:
        lines.append(format_frontier(plan))
    if any(e.basis != "measured" for e in [plan.chosen, *plan.rejected, *(plan.frontier.members if frontier else ())]):
        lines.append(LEGEND)
    return "\n".join(lines)
