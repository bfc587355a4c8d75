"""The greedy baseline solver (registered as ``"greedy"``).

Save every required node at full precision, then apply the move that frees the most bytes per second of
added time until the byte budget is met (or, under a time budget, every such move that still fits). A
baseline in the spirit of knapsack-style activation-checkpointing heuristics; no search.
"""

from __future__ import annotations

import math
import time

from fxmem.solve.moves import Goal, PlanState
from fxmem.solve.problem import Plan, Problem, check_rebuildable, format_tiers, make_plan
from fxmem.solve.registry import register_solver


def _save_all(problem: Problem, needed: set[str]) -> dict[str, str | None]:
    """Every required node saved at full precision; one that cannot be saved is recomputed from its
    inputs, saved in turn where they can be."""
    return {node.name: None for node in problem.reached(lambda node: not node.can_save) if node.can_save}


@register_solver("greedy")
def solve_greedy(problem: Problem, formats: tuple[str, ...] = (), bits: dict[str, int] | None = None) -> Plan:
    """Start from saving every required node; apply the moves that free the most bytes per second of
    added time until the byte budget is met or, under a time budget, each such move that still fits.
    Quantized formats are admitted in the min-cut solver's tiers."""

    started = time.perf_counter()
    bits = bits or {f: 8 for f in formats}
    needed = problem.needed()
    check_rebuildable(problem, needed)
    tiers = format_tiers(tuple(formats), bits)
    start = _save_all(problem, needed)
    if problem.budget_bytes is None:
        state = PlanState(problem, tiers[0], start)
        _fill_time(state, problem.max_added_s)
        return make_plan(problem, state.saved_names(), solver="greedy", solve_time_s=time.perf_counter() - started)
    goal = Goal(False, problem.budget_bytes)
    plan = None
    for tier in tiers:
        state = PlanState(problem, tier, start)
        while not goal.fits_state(state):
            move = _best_free(state)
            if move is None:
                break
            state.apply(move)
        plan = make_plan(problem, state.saved_names(), solver="greedy", solve_time_s=0.0)
        if plan.feasible:
            break
    assert plan is not None
    plan.solve_time_s = time.perf_counter() - started
    return plan


def _best_free(state: PlanState) -> tuple[int, str | None] | None:
    """The move freeing the most bytes per second it adds (a free one first)."""
    best, best_rank = None, None
    for move in state.moves():
        result = state.simulate(move)
        if result is None or result[0] >= 0:
            continue
        rank = (-result[0]) / max(result[1] + result[2], 1e-15)
        if best_rank is None or rank > best_rank:
            best, best_rank = move, rank
    return best


def _fill_time(state: PlanState, limit: float | None) -> None:
    """Apply byte-freeing moves, best bytes per second first, while the added time stays within ``limit``."""
    limit = math.inf if limit is None else limit
    while True:
        best, best_rank = None, None
        for move in state.moves():
            result = state.simulate(move)
            if result is None or result[0] >= 0 or state.time + result[1] > limit * (1 + 1e-12):
                continue
            rank = (-result[0]) / max(result[1] + result[2], 1e-15)
            if best_rank is None or rank > best_rank:
                best, best_rank = move, rank
        if best is None:
            return
        state.apply(best)
