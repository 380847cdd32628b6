"""The frontier (`plan --frontier`, the report's "Frontier" section): the candidates no other one beats on file size,
estimated quality, decode speed, memory and TTFT together. It shows what a budget costs: the chosen candidate is
the least lossy member that meets the budgets, and the members beside it say what a looser budget would buy.

A candidate is dominated when another is at least as good on all five objectives and better on one; members equal
on all five are all kept. It imports no torch and no transformers: the report's plots (edgeprune.build.plots)
use `non_dominated` too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence, TypeVar

if TYPE_CHECKING:
    from edgeprune.build.planner import Evaluated, Plan
    from edgeprune.core.shapes import ModelShape

T = TypeVar("T")
# The objectives, each as a quantity to minimize (decode speed negated): what `objectives` returns, in this order
OBJECTIVES = ("file size", "estimated quality loss", "decode speed", "memory", "TTFT")


def objectives(e: Evaluated) -> tuple[float, float, float, float, float]:
    """`e`'s five objectives, each smaller-is-better."""
    p = e.prediction
    return p.size.file_bytes, e.quality_loss, -p.decode_tps, p.memory_bytes, p.ttft_s


def non_dominated(items: Sequence[T], key: Callable[[T], tuple[float, ...]]) -> list[T]:
    """The items no other item dominates on `key`'s smaller-is-better objectives, in ascending key order; items with
    equal keys are all kept. Sorted first, an item can only be dominated by one before it, and by a kept one if by
    any (dominance is transitive), so each is compared with the kept ones only."""
    kept: list[tuple[tuple[float, ...], T]] = []
    for k, item in sorted(((key(i), i) for i in items), key=lambda pair: pair[0]):
        if not any(_dominates(other, k) for other, _ in kept):
            kept.append((k, item))
    return [item for _, item in kept]


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and a != b


@dataclass(frozen=True)
class Frontier:
    members: list[Evaluated]  # non-dominated on the five objectives, smallest file first
    memory_mib: float  # the profile's budgets, drawn as lines on the plot's size axis
    max_file_mib: float | None

    @classmethod
    def of(cls, evaluated: Sequence[Evaluated], budgets) -> Frontier:
        """The frontier of every evaluated candidate, with the profile's size budgets (a device.profiles.Budgets)."""
        return cls(non_dominated(evaluated, objectives), budgets.memory_mib, budgets.max_file_mib)

    def beater(self, e: Evaluated) -> Evaluated | None:
        """The first member that dominates `e`, or None when `e` is on the frontier."""
        return next((m for m in self.members if _dominates(objectives(m), objectives(e))), None)

    def to_dict(self, base: ModelShape, chosen: Evaluated) -> dict:
        """The members as the plan's candidates, each saying whether it meets the budgets and is the chosen one."""
        return {
            "objectives": list(OBJECTIVES), "budgets": {"memory_mib": self.memory_mib, "file_mib": self.max_file_mib},
            "chosen_on_frontier": self.beater(chosen) is None,
            "members": [{**e.to_dict(base), "meets_budgets": e.feasible, "chosen": e is chosen} for e in self.members],
        }


def format_frontier(plan: Plan) -> str:
    """The members, smallest file first: predictions, estimate, which budgets each breaks, and the chosen one."""
    frontier, base = plan.frontier, plan.base
    lines = [f"frontier   {len(frontier.members)} of {plan.n_candidates} candidates are beaten by no other on file "
             "size, estimated quality, decode speed, memory and TTFT together:"]
    width = max(len(e.candidate.label(base)) for e in frontier.members)
    for e in frontier.members:
        d = e.to_dict(base)
        verdict = "meets the budgets" if e.feasible else "breaks " + ", ".join(v.budget for v in e.violations)
        mark = "* " if e is plan.chosen else "  "
        lines.append(f"{mark}{d['label']:<{width}} {d['file_mib']:>7.1f} MiB {d['memory_mib']:>7.1f} MiB "
                     f"{d['decode_tps']:>6.1f} tok/s {d['ttft_s']:>5.2f} s  PPL {e.estimate:<7} {verdict}")
    lines.append("  (* the chosen one; columns: file, memory, decode, TTFT, est. PPL)")
    if (beater := frontier.beater(plan.chosen)) is not None:
        if beater.violations:  # one the five do not weigh: recovery time
            reason = "but breaks " + ", ".join(v.budget for v in beater.violations)
        elif plan.measured:
            reason = "on the estimates; --search measured chose by the PPL llama.cpp measured"
        else:
            reason = "and ties it on estimated loss, which alone ranks the candidates"
        lines.append(f"  the chosen {plan.chosen.candidate.label(base)} is off the frontier: "
                     f"{beater.candidate.label(base)} beats it {reason}")
    return "\n".join(lines)
