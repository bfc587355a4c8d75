"""An exact solver: a 0/1 integer program solved by HiGHS through ``scipy.optimize.milp``.

Over the nodes the backward may touch, binary variables pick for each node ``v`` at most one of

* ``s[v, f]``: saved, at full precision (``f = None``) or in an admitted quantized format ``f``;
* ``r[v]``: recomputed in the backward.

A required node is saved or recomputed (``sum_f s[v, f] + r[v] >= 1``); a recomputed node's inputs are
each saved or recomputed (``r[v] <= sum_f s[u, f] + r[u]`` for every input ``u``); a node that cannot be
saved has no ``s`` variables and one that cannot be recomputed no ``r``. Held bytes are
``sum s[v, f] * bytes(v, f)``; added time is ``sum r[v] * recompute_s(v) + sum s[v, f] * added_s(v, f)``.

With a byte budget it minimises the added time subject to held bytes <= budget, then, among the plans
that fast, the held bytes (a second solve); with none, it minimises held bytes subject to added time <=
``max_added_s``, then the time. As in the min-cut solver, the time it minimises includes each quantized
format's ``penalty_s`` (a price on lost precision), while the time budget and the reported
``Plan.added_s`` do not. It admits quantized formats in the same tiers as the min-cut solver
(8-bit first, then also 4, then also 2, stopping at the first tier that meets the budget; with a time
budget only the widest tier), so both solve the same problem and their objectives compare.

Optimal up to HiGHS's tolerances. On the synthetic families of ``fxmem.solve.synthetic`` it solves
graphs of a few thousand nodes in seconds, but the problem is NP-hard (a knapsack hides in it): a hard
graph may reach ``time_limit_s``, and then the plan is the best one found, with the remaining gap in
``Plan.notes`` (or, if none was found, the min-cut solver's plan, saying so).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from fxmem.solve.problem import Plan, Problem, check_rebuildable, format_tiers, make_plan
from fxmem.solve.registry import register_solver

DEFAULT_TIME_LIMIT_S = 60.0
DEFAULT_MIP_REL_GAP = 1e-6
# Objectives are scaled so that their largest possible value is _SCALE: HiGHS's absolute gap (1e-6)
# is then far below any difference that matters.
_SCALE = 1e4
# Second stage (fewest bytes among the fastest plans, or the reverse): how far the first objective may move.
_LEXICOGRAPHIC_SLACK = 1e-9
_RETRIES = 3  # re-solves with a tightened budget row when HiGHS's tolerance let the plan overshoot it


def _scipy() -> tuple[Any, Any, Any, Any]:
    """``milp``, ``Bounds``, ``LinearConstraint`` and ``coo_matrix``, imported only when needed."""
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import coo_matrix
    except ImportError as exc:  # scipy missing, or older than 1.9
        raise ImportError("solver 'ilp' needs scipy >= 1.9 (scipy.optimize.milp, HiGHS): pip install scipy") from exc
    return milp, Bounds, LinearConstraint, coo_matrix


@dataclass
class _Result:
    saved: dict[str, str | None] | None  # None: no solution (infeasible, or none found in time)
    status: int
    message: str
    gap: float | None
    x: np.ndarray | None = None


class _Model:
    """The 0/1 program for one tier of admitted formats."""

    def __init__(self, problem: Problem, formats: frozenset[str], needed: set[str]) -> None:
        self.problem = problem
        # Columns: (node name, "s", fmt or None) or (node name, "r", None).
        self.columns: list[tuple[str, str, str | None]] = []
        byte_cost: list[float] = []
        time_cost: list[float] = []
        penalty: list[float] = []
        choices: dict[str, list[int]] = {}  # node -> its columns (saved in any format, or recomputed)
        recompute_col: dict[str, int] = {}
        for node in problem.nodes:
            if node.name not in needed:
                continue
            cols = choices.setdefault(node.name, [])
            if node.can_save:
                cols.append(len(self.columns))
                self.columns.append((node.name, "s", None))
                byte_cost.append(node.save_bytes)
                time_cost.append(0.0)
                penalty.append(0.0)
                for option in node.quant_options:
                    if option.fmt in formats:
                        cols.append(len(self.columns))
                        self.columns.append((node.name, "s", option.fmt))
                        byte_cost.append(option.stored_bytes)
                        time_cost.append(option.added_s)
                        penalty.append(option.penalty_s)
            if node.can_recompute:
                recompute_col[node.name] = len(self.columns)
                cols.append(len(self.columns))
                self.columns.append((node.name, "r", None))
                byte_cost.append(0.0)
                time_cost.append(node.recompute_s)
                penalty.append(0.0)
        self.bytes = np.asarray(byte_cost, dtype=np.float64)
        self.time = np.asarray(time_cost, dtype=np.float64)  # what the plan adds to a step
        # what solvers minimise: the time plus the precision penalty of quantized formats
        self.objective_time = self.time + np.asarray(penalty, dtype=np.float64)

        rows: list[int] = []
        cols_: list[int] = []
        vals: list[float] = []
        lower: list[float] = []
        upper: list[float] = []

        def row(entries: list[tuple[int, float]], lo: float, hi: float) -> None:
            r = len(lower)
            for c, v in entries:
                rows.append(r)
                cols_.append(c)
                vals.append(v)
            lower.append(lo)
            upper.append(hi)

        for node in problem.nodes:
            if node.name not in needed:
                continue
            cols = choices[node.name]
            # At most one choice; a required node needs one.
            row([(c, 1.0) for c in cols], 1.0 if node.required else 0.0, 1.0)
            r_v = recompute_col.get(node.name)
            if r_v is None:
                continue
            for name in dict.fromkeys(node.inputs):  # an input read twice constrains once
                # r[v] - sum(choices of u) <= 0
                row([(r_v, 1.0)] + [(c, -1.0) for c in choices[name]], -np.inf, 0.0)
        self.n_rows = len(lower)
        self.structure = (np.asarray(rows), np.asarray(cols_), np.asarray(vals), np.asarray(lower), np.asarray(upper))

    def solve(
        self,
        objective: np.ndarray,
        limits: list[tuple[np.ndarray, float]],
        *,
        deadline: float,
        mip_rel_gap: float,
    ) -> _Result:
        """Minimise ``objective @ x`` subject to the structure and ``coeff @ x <= rhs`` for each limit."""
        milp, Bounds, LinearConstraint, coo_matrix = _scipy()  # noqa: N806
        n = len(self.columns)
        if n == 0:  # nothing needed: nothing to save
            return _Result({}, 0, "empty problem", 0.0, np.zeros(0))
        total = float(np.abs(objective).sum())
        c = objective * (_SCALE / total) if total > 0 else np.zeros(n)
        rows, cols, vals, lower, upper = self.structure
        for coeff, rhs in limits:
            scale = max(abs(rhs), float(np.abs(coeff).max(initial=0.0)), 1e-300)
            nz = np.nonzero(coeff)[0]
            rows = np.concatenate([rows, np.full(len(nz), len(lower))])
            cols = np.concatenate([cols, nz])
            vals = np.concatenate([vals, coeff[nz] / scale])
            lower = np.append(lower, -np.inf)
            upper = np.append(upper, rhs / scale)
        constraints = []
        if len(lower):
            matrix = coo_matrix((vals, (rows, cols)), shape=(len(lower), n)).tocsr()
            constraints.append(LinearConstraint(matrix, lower, upper))
        res = milp(
            c,
            integrality=np.ones(n),
            bounds=Bounds(0, 1),
            constraints=constraints,
            options={
                "time_limit": max(deadline - time.perf_counter(), 1e-3),
                "mip_rel_gap": mip_rel_gap,
                "presolve": True,
            },
        )
        if res.x is None:
            return _Result(None, res.status, res.message, None)
        x = np.round(res.x)
        saved = {name: fmt for (name, what, fmt), on in zip(self.columns, x, strict=True) if on and what == "s"}
        return _Result(saved, res.status, res.message, getattr(res, "mip_gap", None), x)

    def lexicographic(
        self, first: np.ndarray, second: np.ndarray, limits: list[tuple[np.ndarray, float]], **opts: Any
    ) -> _Result:
        """Minimise ``first``, then ``second`` among the plans that keep ``first`` at its minimum."""
        best = self.solve(first, limits, **opts)
        if best.saved is None or best.x is None or not np.any(second):
            return best
        value = float(first @ best.x)
        slack = _LEXICOGRAPHIC_SLACK * max(value, float(np.abs(first).max(initial=0.0)))
        tied = self.solve(second, [*limits, (first, value + slack)], **opts)
        if tied.saved is None:
            return best
        return _Result(tied.saved, best.status, best.message, best.gap, tied.x)


def _limited(model: _Model, problem: Problem, by_bytes: bool, **opts: Any) -> _Result:
    """Minimise time under the byte budget (``by_bytes``) or bytes under the time budget, re-solving
    with a tightened limit if HiGHS's feasibility tolerance let the rounded plan overshoot it."""
    if by_bytes:
        primary, tie, coeff, limit = model.objective_time, model.bytes, model.bytes, float(problem.budget_bytes)
    else:
        primary, tie, coeff, limit = model.bytes, model.objective_time, model.time, float(problem.max_added_s)
    rhs = limit
    for _ in range(_RETRIES):
        result = model.lexicographic(primary, tie, [(coeff, rhs)], **opts)
        if result.saved is None:
            return result
        plan = make_plan(problem, result.saved, solver="ilp", solve_time_s=0.0)
        used = plan.saved_bytes if by_bytes else plan.added_s
        if used <= (limit + 1e-9 if by_bytes else limit * (1 + 1e-9)):
            return result
        rhs -= (used - limit) + 1e-9 * abs(limit)
    return result


@register_solver("ilp")
def solve_ilp(
    problem: Problem,
    formats: tuple[str, ...] = (),
    bits: dict[str, int] | None = None,
    *,
    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
    mip_rel_gap: float = DEFAULT_MIP_REL_GAP,
) -> Plan:
    """Meet ``problem.budget_bytes`` with the least added time or, with no byte budget, hold the fewest
    bytes whose added time stays within ``problem.max_added_s``. If the budget cannot be met, returns
    the plan holding the fewest bytes (or adding the least time) with ``feasible=False``."""
    _scipy()
    started = time.perf_counter()
    deadline = started + time_limit_s
    bits = bits or {f: 8 for f in formats}
    needed = problem.needed()
    check_rebuildable(problem, needed)
    tiers = format_tiers(tuple(formats), bits)
    notes: list[str] = []

    def opts() -> dict[str, float]:
        return {"deadline": deadline, "mip_rel_gap": mip_rel_gap}

    def finish(result: _Result, tier: frozenset[str], what: str) -> Plan:
        assert result.saved is not None
        notes.append(f"{what}; formats {sorted(tier) or 'none'}; HiGHS: {result.message}")
        if result.status != 0 and result.gap is not None:
            notes.append(f"not proven optimal: gap {result.gap:.2%}")
        return make_plan(problem, result.saved, solver="ilp", solve_time_s=time.perf_counter() - started, notes=notes)

    if problem.budget_bytes is None:
        tier = tiers[0]  # a time budget: the widest formats only, as the min-cut solver
        model = _Model(problem, tier, needed)
        limit = problem.max_added_s
        if limit is None or math.isinf(limit):
            result = model.lexicographic(model.bytes, model.objective_time, [], **opts())
            return finish(result, tier, "fewest bytes")
        result = _limited(model, problem, False, **opts())
        if result.saved is not None:
            return finish(result, tier, "fewest bytes within the time budget")
        if result.status != 2:
            return _fallback(problem, formats, bits, started, result)
        result = model.lexicographic(model.time, model.bytes, [], **opts())
        return finish(result, tier, "time budget unreachable: least time")

    for tier in tiers:
        model = _Model(problem, tier, needed)
        result = _limited(model, problem, True, **opts())
        if result.saved is not None:
            return finish(result, tier, "least time within the byte budget")
        if result.status != 2:  # out of time before finding any plan
            return _fallback(problem, formats, bits, started, result)
    tier = tiers[-1]
    model = _Model(problem, tier, needed)
    result = model.lexicographic(model.bytes, model.objective_time, [], **opts())
    if result.saved is None:
        return _fallback(problem, formats, bits, started, result)
    return finish(result, tier, "byte budget unreachable: fewest bytes")


def _fallback(
    problem: Problem, formats: tuple[str, ...], bits: dict[str, int], started: float, result: _Result
) -> Plan:
    """No integer solution within the time limit: return the min-cut solver's plan, saying so."""
    from fxmem.solve.mincut import solve_mincut

    plan = solve_mincut(problem, formats, bits)
    plan.solver = "ilp"
    plan.notes.insert(0, f"ILP found no plan in time (HiGHS: {result.message}); this is the min-cut plan")
    plan.solve_time_s = time.perf_counter() - started
    return plan
