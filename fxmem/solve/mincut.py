"""The default solver: a Lagrangian min-cut over keep / recompute / quantize, searched on its price.

For a price ``lam`` (bytes per second of added time) one s-t min-cut finds the plan minimising
``held bytes + lam * added seconds`` exactly: each node is split into ``in -> out`` whose capacity is
the cheapest way to hold it (full precision, or a quantized format plus ``lam`` times its quantize and
dequantize time); recomputing a node cuts ``source -> in``, priced ``lam`` times its recompute time.
Held bytes fall as ``lam`` falls, so a bisection on ``lam`` meets a byte budget with the least added
time, or a time budget with the fewest bytes. Quantized formats are admitted in tiers, widest first, so
a budget that 8 bits meet never gets 4.
"""

from __future__ import annotations

import math
import time

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import breadth_first_order, maximum_flow

from fxmem.solve.problem import Plan, Problem, SolverNode, check_rebuildable, format_tiers, make_plan
from fxmem.solve.refine import refine_bracket
from fxmem.solve.registry import register_solver

_SOURCE, _SINK = "__source__", "__sink__"
_LAM_LO, _LAM_HI = 1e-2, 1e16
_ITERATIONS = 22
# scipy's max-flow counts in int32: finite capacities are scaled to integers summing to at most
# _CAP_LIMIT, so any flow fits; infinite ones get _CAP_INF, which no finite cut reaches.
_CAP_LIMIT = 2**29
_CAP_INF = 2**30


def _save_capacity(node: SolverNode, lam: float, formats: frozenset[str]) -> tuple[float, str | None]:
    best, best_fmt = float(node.save_bytes), None
    for option in node.quant_options:
        if option.fmt in formats:
            cost = option.stored_bytes + lam * (option.added_s + option.penalty_s)
            if cost < best:
                best, best_fmt = cost, option.fmt
    return best, best_fmt


class _FlowGraph:
    """A directed graph with integer capacities, cut by scipy's max-flow (C code: fast enough to run a
    few dozen cuts on a GPT-2 joint graph in about a second)."""

    def __init__(self) -> None:
        self.index: dict[object, int] = {_SOURCE: 0, _SINK: 1}
        self.edges: dict[tuple[int, int], float] = {}

    def vertex(self, key: object) -> int:
        return self.index.setdefault(key, len(self.index))

    def add_edge(self, u: object, v: object, capacity: float = math.inf) -> None:
        edge = (self.vertex(u), self.vertex(v))
        self.edges[edge] = capacity if edge not in self.edges else max(capacity, self.edges[edge])

    def source_side(self) -> set[object]:
        n = len(self.index)
        pairs = np.array(list(self.edges), dtype=np.int64).reshape(-1, 2)
        caps = np.array(list(self.edges.values()), dtype=np.float64)
        finite = np.isfinite(caps)
        scale = _CAP_LIMIT / max(1.0, caps[finite].sum())
        ints = np.where(finite, np.floor(caps * scale), _CAP_INF).astype(np.int32)
        matrix = sparse.csr_matrix((ints, (pairs[:, 0], pairs[:, 1])), shape=(n, n))
        matrix.sort_indices()
        result = maximum_flow(matrix, 0, 1)
        flow = result.flow.tocsr()
        residual = (matrix - flow).tocsr()
        residual.data = np.where(residual.data > 0, 1, 0)
        residual.eliminate_zeros()
        reached = breadth_first_order(residual, 0, directed=True, return_predecessors=False)
        keys = list(self.index)
        return {keys[i] for i in reached}


def cut(problem: Problem, lam: float, formats: frozenset[str], needed: set[str]) -> dict[str, str | None]:
    """The saved set (with formats) minimising held bytes + ``lam`` * added seconds."""
    check_rebuildable(problem, needed)
    graph = _FlowGraph()
    chosen_fmt: dict[str, str | None] = {}
    for node in problem.nodes:
        if node.name not in needed:
            continue
        v_in, v_out = (node.name, "in"), (node.name, "out")
        if node.can_save:
            capacity, chosen_fmt[node.name] = _save_capacity(node, lam, formats)
            graph.add_edge(v_in, v_out, capacity)
        else:
            graph.add_edge(v_in, v_out)
        if not node.can_recompute:
            graph.add_edge(_SOURCE, v_in)
        elif node.recompute_s > 0:
            graph.add_edge(_SOURCE, v_in, lam * node.recompute_s)
        if node.required:
            graph.add_edge(v_out, _SINK)
        for name in node.inputs:
            graph.add_edge((name, "out"), v_in)
    source_side = graph.source_side()
    return {
        name: fmt
        for name, fmt in chosen_fmt.items()
        if (name, "in") in source_side and (name, "out") not in source_side
    }


@register_solver("mincut")
def solve_mincut(
    problem: Problem, formats: tuple[str, ...] = (), bits: dict[str, int] | None = None, *, refine: bool = True
) -> Plan:
    """Meet ``problem.budget_bytes`` with the least added time, or, with no byte budget, hold the fewest
    bytes whose added time stays within ``problem.max_added_s``. ``refine``: finish with
    :func:`fxmem.solve.refine.refine_bracket`, which reaches budgets between two prices' plans."""
    started = time.perf_counter()
    bits = bits or {f: 8 for f in formats}
    needed = problem.needed()
    tiers = format_tiers(formats, bits)
    if problem.budget_bytes is None:
        # A time budget: quantize only with the widest formats, and only where the time allows.
        saved, lam = _search(problem, tiers[0], needed, by_time=True, refine=refine)
        notes = [f"price {lam:.3g} B/s"]
        return make_plan(problem, saved, solver="mincut", solve_time_s=time.perf_counter() - started, notes=notes)
    plan = None
    for tier in tiers:
        saved, lam = _search(problem, tier, needed, by_time=False, refine=refine)
        plan = make_plan(problem, saved, solver="mincut", solve_time_s=0.0, notes=[f"price {lam:.3g} B/s"])
        if plan.feasible:
            break
    assert plan is not None
    plan.solve_time_s = time.perf_counter() - started
    return plan


def _search(
    problem: Problem, formats: frozenset[str], needed: set[str], *, by_time: bool, refine: bool = False
) -> tuple[dict, float]:
    """Bisect the price on a log scale. ``by_time``: the smallest price whose plan keeps the added time
    within ``max_added_s``; otherwise the largest price whose plan holds at most ``budget_bytes``."""

    def ok(saved: dict[str, str | None]) -> bool:
        plan = make_plan(problem, saved, solver="mincut", solve_time_s=0.0)
        if by_time:
            limit = problem.max_added_s
            return limit is None or math.isinf(limit) or plan.added_s <= limit
        return plan.saved_bytes <= problem.budget_bytes

    lo, hi = math.log(_LAM_LO), math.log(_LAM_HI)
    # by_time: ok(hi) holds, find the smallest ok; by bytes: ok(lo) should hold, find the largest ok.
    good_lam = _LAM_HI if by_time else _LAM_LO
    good = cut(problem, good_lam, formats, needed)
    if not ok(good):
        return good, good_lam
    bad = None  # the last plan past the budget: the other side of the bracket
    met = [good]  # every plan the search meets: more starts for the refinement
    for _ in range(_ITERATIONS):
        mid = (lo + hi) / 2
        saved = cut(problem, math.exp(mid), formats, needed)
        if saved not in met:
            met.append(saved)
        if ok(saved):
            good, good_lam = saved, math.exp(mid)
            if by_time:
                hi = mid
            else:
                lo = mid
        else:
            bad = saved
            if by_time:
                lo = mid
            else:
                hi = mid
    if refine:
        others = [saved for saved in met if saved != good and saved != bad]
        good = refine_bracket(problem, good, bad, formats, by_time=by_time, price=good_lam, others=others)
    return good, good_lam
