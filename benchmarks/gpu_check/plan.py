"""The check's plan: its stages, the share of the budget each gets, and the compiles each will cost.

The budget (``--budget``, 480 s by default: a GPU session's one command) less a reserve for the report
is shared out as the stages start: a stage gets its share of what is left, in proportion to the shares of
the stages still to run (itself included), so time a stage does not use goes to the later ones, and the
limits planned at the start add up to the budget. A stage whose share is below its floor (the least it
can do anything useful in) is skipped, and the report says so.

The shares follow what each stage costs on an H200 (``benchmarks/README.md``: start-ups, Triton
compiles at about 1 s each, torch.compile of BERT-base, the sanitizer's slow-down); the dry run's follow
what each costs on a 2-core CPU.
"""

from __future__ import annotations

STAGES = ("env", "compile", "correctness", "sanitizer", "bench", "embed", "report")
DEFAULT_BUDGET = 480.0
REPORT_RESERVE_S = 10.0  # the report, after the last stage: markdown, plot, files
# Shares of the budget less the report's reserve, and floors in seconds.
SHARES = {"env": 0.04, "compile": 0.14, "correctness": 0.24, "sanitizer": 0.13, "bench": 0.33, "embed": 0.12}
FLOORS = {"env": 8, "compile": 15, "correctness": 30, "sanitizer": 15, "bench": 45, "embed": 20}
DRY_SHARES = {"env": 0.06, "compile": 0.22, "correctness": 0.18, "sanitizer": 0.13, "bench": 0.21, "embed": 0.20}
DRY_FLOORS = {"env": 10, "compile": 15, "correctness": 15, "sanitizer": 10, "bench": 30, "embed": 25}
TRITON_COMPILE_S = 1.2  # one new Triton kernel on an H200's host (0.9-1.5 s measured for sm_90 builds)
CORRECTNESS_WORKERS = 8  # pytest-xdist workers on the GPU machine's 16 cores


def shares(dry: bool) -> tuple[dict, dict]:
    return (DRY_SHARES, DRY_FLOORS) if dry else (SHARES, FLOORS)


def planned_limits(budget: float, selected: list[str], dry: bool) -> dict[str, float]:
    """Each selected stage's limit if every stage ran to its limit: its share of the budget less the
    report's reserve. They add up to that."""
    share, _ = shares(dry)
    stages = [s for s in selected if s in share]
    total = sum(share[s] for s in stages)
    usable = max(budget - REPORT_RESERVE_S, 0.0)
    return {s: usable * share[s] / total for s in stages}


def stage_limit(stage: str, left: float, later: list[str], dry: bool) -> float | None:
    """The limit ``stage`` starts with when ``left`` seconds of the budget (less the report's reserve)
    remain and ``later`` stages follow it: its share of them, raised to its floor, but never into the later
    stages' floors; None when its floor does not fit."""
    share, floor = shares(dry)
    proportional = left * share[stage] / (share[stage] + sum(share[s] for s in later))
    limit = min(max(proportional, floor[stage]), left - sum(floor[s] for s in later))
    return limit if limit >= floor[stage] else None


def new_compiles(keys_by_stage: dict[str, list[str]]) -> dict[str, int]:
    """Per stage, the launch keys (Triton specialisations) no earlier stage launched: the binaries it will
    compile into the shared Triton cache."""
    seen: set[str] = set()
    out = {}
    for stage in STAGES:
        keys = set(keys_by_stage.get(stage) or ())
        if stage in keys_by_stage:
            out[stage] = len(keys - seen)
        seen |= keys
    return out
