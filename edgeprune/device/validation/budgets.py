"""A profile's budgets against what was measured (or, off the device, predicted for it): the checks and the verdict."""

from __future__ import annotations

from typing import Any

from edgeprune.device.validation.results import MIB, BudgetCheck, MemoryResult, Predicted, SpeedResult

AT_LEAST = {"decode_tps"}  # budget checks whose measurement must reach the limit rather than stay under it


def budget_value(budgets: Any, name: str) -> Any:
    """One budget of a profile's budgets, None when there are no budgets or that one is not set."""
    return getattr(budgets, name, None) if budgets is not None else None


def check_budgets(speed: SpeedResult, memory: MemoryResult, budgets: Any,
                  device: Predicted | None = None) -> list[BudgetCheck]:
    """Compare with a profile's budgets; a budget set to None is not checked. Speed comes from `device`'s
    prediction when given (validation off the device), else from the measurement.

    `memory` must have been measured at budgets.context_length and `speed` with budgets.ttft_prompt_tokens.
    """
    measured = "measured here"
    speed_basis = f"predicted for {device.device}" if device else measured
    wanted = [
        ("memory", budget_value(budgets, "memory_mib"), memory.total_bytes / MIB, "MiB", measured),
        ("decode_tps", budget_value(budgets, "min_decode_tps"), device.decode_tps if device else speed.decode_tps,
         "tok/s", speed_basis),
        ("ttft", budget_value(budgets, "max_ttft_s"), device.ttft_s if device else speed.ttft_s, "s", speed_basis),
        ("file_size", budget_value(budgets, "max_file_mib"), memory.file_bytes / MIB, "MiB", measured),
    ]
    return [
        BudgetCheck(name, float(limit), float(value), unit,
                    value >= limit if name in AT_LEAST else value <= limit, basis)
        for name, limit, value, unit, basis in wanted
        if limit is not None
    ]


def verdict(checks: list[BudgetCheck], budgets: Any) -> bool | None:
    """Whether every check passed; None when no budgets were given."""
    return all(c.passed for c in checks) if budgets is not None else None
