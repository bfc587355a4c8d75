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

from fxmem.solve.problem import Plan, Problem, check_rebuildable, format_tiers, make_plan
from fxmem.solve.refine import refine_bracket
from fxmem.solve.registry import register_solver

_SOURCE, _SINK = "__source__", "__sink__"
_LAM_LO, _LAM_HI = 1e-2, 1e16
_ITERATIONS = 22
# scipy's max-flow counts in int32: finite capacities are scaled to integers summing to at most
# _CAP_LIMIT, so any flow fits; infinite ones get _CAP_INF, which no finite cut reaches.
_CAP_LIMIT = 2**29
_CAP_INF = 2**30


class CutGraph:
    """The flow graph of one problem over the nodes the backward may need, for one tier of formats.
    Its edges do not depend on the price; :meth:`cut` sets the capacities for one and cuts (scipy's
    max-flow, C code: fast enough for a few dozen cuts on a GPT-2 joint graph in about a second)."""

    def __init__(self, problem: Problem, formats: frozenset[str], needed: set[str]) -> None:
        check_rebuildable(problem, needed)
        index: dict[object, int] = {_SOURCE: 0, _SINK: 1}
        pairs: dict[tuple[int, int], None] = {}
        save_edges, recompute_edges, recompute_s = [], [], []
        stored, seconds, fmts = [], [], []  # per savable node: full precision, then each admitted format
        self.savable: list[tuple[str, int, int]] = []  # (name, in vertex, out vertex)

        def edge(u: object, v: object) -> int | None:
            pair = (index.setdefault(u, len(index)), index.setdefault(v, len(index)))
            if pair in pairs:
                return None  # only a node's edge from an input it reads twice repeats: infinite both times
            pairs[pair] = None
            return len(pairs) - 1

        for node in problem.nodes:
            if node.name not in needed:
                continue
            v_in, v_out = (node.name, "in"), (node.name, "out")
            position = edge(v_in, v_out)
            if node.can_save:
                save_edges.append(position)
                self.savable.append((node.name, index[v_in], index[v_out]))
                options = [o for o in node.quant_options if o.fmt in formats]
                stored.append([float(node.save_bytes)] + [o.stored_bytes for o in options])
                seconds.append([0.0] + [o.added_s + o.penalty_s for o in options])
                fmts.append([None] + [o.fmt for o in options])
            if not node.can_recompute:
                edge(_SOURCE, v_in)
            elif node.recompute_s > 0:
                recompute_edges.append(edge(_SOURCE, v_in))
                recompute_s.append(node.recompute_s)
            if node.required:
                edge(v_out, _SINK)
            for name in node.inputs:
                edge((name, "out"), v_in)
        width = max((len(row) for row in stored), default=1)
        self.stored = np.array([row + [math.inf] * (width - len(row)) for row in stored]).reshape(-1, width)
        self.seconds = np.array([row + [0.0] * (width - len(row)) for row in seconds]).reshape(-1, width)
        self.fmts = fmts
        self.save_edges = np.array(save_edges, dtype=np.int64)
        self.recompute_edges = np.array(recompute_edges, dtype=np.int64)
        self.recompute_s = np.array(recompute_s)
        self.n_edges, self.n_vertices = len(pairs), len(index)
        ends = np.array(list(pairs), dtype=np.int64).reshape(-1, 2)
        # The matrix's layout is fixed; each cut writes capacities into it in edge order via ``order``.
        self.matrix = sparse.csr_matrix(
            (np.arange(1, len(pairs) + 1, dtype=np.int32), (ends[:, 0], ends[:, 1])),
            shape=(len(index), len(index)),
        )
        self.matrix.sort_indices()
        self.order = self.matrix.data - 1

    def cut(self, lam: float) -> dict[str, str | None]:
        """The saved set (with formats) minimising held bytes + ``lam`` * added seconds."""
        costs = self.stored + lam * self.seconds
        best = costs.argmin(axis=1)  # the first of equal costs: full precision, then the wider format
        caps = np.full(self.n_edges, math.inf)
        caps[self.save_edges] = costs[np.arange(len(best)), best]
        caps[self.recompute_edges] = lam * self.recompute_s
        finite = np.isfinite(caps)
        scale = _CAP_LIMIT / max(1.0, caps[finite].sum())
        ints = np.where(finite, np.floor(caps * scale), _CAP_INF).astype(np.int32)
        matrix = self.matrix.copy()
        matrix.data = ints[self.order]
        flow = maximum_flow(matrix, 0, 1).flow.tocsr()
        residual = (matrix - flow).tocsr()
        residual.data = np.where(residual.data > 0, 1, 0)
        residual.eliminate_zeros()
        reached = np.zeros(self.n_vertices, dtype=bool)
        reached[breadth_first_order(residual, 0, directed=True, return_predecessors=False)] = True
        return {
            name: self.fmts[k][best[k]]
            for k, (name, v_in, v_out) in enumerate(self.savable)
            if reached[v_in] and not reached[v_out]
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
    graph = CutGraph(problem, formats, needed)
    good = graph.cut(good_lam)
    if not ok(good):
        return good, good_lam
    bad = None  # the last plan past the budget: the other side of the bracket
    met = [good]  # every plan the search meets: more starts for the refinement
    for _ in range(_ITERATIONS):
        mid = (lo + hi) / 2
        saved = graph.cut(math.exp(mid))
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
