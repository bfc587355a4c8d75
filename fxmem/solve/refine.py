"""The min-cut solver's refinement: from the bracket the price search ends in, a plan that uses the budget.

The bisection ends between a plan that meets the budget and one just past it, two neighbouring vertices
of the lower convex hull of (bytes, time) trade-offs. Budgets between them are not reachable by any
price (the Lagrangian duality gap), so :func:`refine_bracket` runs a local search from several plans:
the best of a path from the feasible plan towards the infeasible one (a connected group of differing
nodes at a time, and the groups a knapsack picks), the infeasible plan brought within the budget, and
the other plans the price search met nearest the budget. A round of the search applies the best single
move that fits, or the set of moves that fits together at the most gain (a knapsack), else the best
*compound move*: one move that buys time but overshoots plus the moves that pay for it at the least
loss, or one move that frees room plus the moves that fill it at the most gain. Knapsacks estimate
them; the most promising are applied for real, then searched one level deeper.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fxmem.solve.moves import REMOVED, Goal, PlanState
from fxmem.solve.problem import Problem

# Search effort, in node visits (a visit is 0.4 to 1 µs of Python): per node the backward may need, and
# at most DEFAULT_WORK (about 0.8 s), which bounds the refinement of large graphs.
DEFAULT_WORK = 1_000_000
_WORK_PER_NODE = 1_000
_STARTS = 4  # other plans of the price search the local search also starts from, nearest the limit first
_TRIALS = 8  # compound moves tried for real per round
_FREE_STEPS = 24  # freeing moves at most per repair
_PATH_MISSES = 8  # the group-by-group path stops after this many plans in a row that do not fit
_CELLS = 256  # resolution of the knapsacks: the bytes (or time) to free or fill, in this many steps
_CELL_WORK = 8  # node visits one knapsack item costs, for the work meter

Move = tuple[int, Any]


def _simulated(state: PlanState, skip: int = -1) -> list[tuple[Move, int, float, float]]:
    """Every move from ``state`` (but those on node ``skip``) that applies, with its deltas."""
    out = []
    for move in state.moves():
        if move[0] == skip:
            continue
        result = state.simulate(move)
        if result is not None:
            out.append((move, result[0], result[1], result[2]))
    return out


def local_search(
    state: PlanState,
    goal: Goal,
    *,
    work: int = DEFAULT_WORK,
    depth: int = 1,
    explored: set[frozenset[tuple[int, str | None]]] | None = None,
) -> PlanState:
    """Improve a plan that fits ``goal``: each round applies the best single move that still fits (or,
    if better, the moves that fit together at the most gain), else (``depth`` > 0) the best compound
    move (see :func:`_compound`) followed by a search of depth ``depth - 1``. Stops at a local optimum
    or after ``work`` node visits.

    ``explored``: the plans earlier searches passed through, shared between them. The search is
    deterministic, so from one of those it would retrace an earlier search to the same local optimum:
    it stops there instead (at a plan no better than that optimum). It adds the plans it passes through."""
    stop_at = state.work + work
    current = goal.key_of(state)
    while state.work < stop_at:
        if explored is not None:
            here = frozenset(state.saved.items())
            if here in explored:
                break
            explored.add(here)
        moves = _simulated(state)
        best = None
        for move, db, dt, dp in moves:
            if goal.gain(db, dt, dp) < 0 and goal.cost(db, dt) >= 0:  # worse on both counts
                continue
            b, t = state.bytes + db, state.time + dt
            if not goal.fits(b, t):
                continue
            key = goal.key(b, t, state.penalty + dp)
            if key < current and (best is None or key < best[0]):
                best = (key, move)
        if best is not None:
            filled = _fill(state, goal, moves)
            if filled is not None and goal.key_of(filled) < best[0]:
                state = filled
            else:
                state.apply(best[1])
        else:
            better = _compound(state, goal, moves, stop_at, depth - 1) if depth > 0 else None
            if better is None:
                break
            state = better
        current = goal.key_of(state)
    return state


def _fill(state: PlanState, goal: Goal, moves: list[tuple[Move, int, float, float]]) -> PlanState | None:
    """The buying moves that fit together at the most gain (a knapsack), applied where each still fits
    and gains; ``None`` when that is a single move."""
    slack = goal.limit - goal.cost(state.bytes, state.time)
    buys = []
    for move, db, dt, dp in moves:
        cost, gain = goal.cost(db, dt), goal.gain(db, dt, dp)
        if gain > 0 and 0 < cost <= slack:
            buys.append((cost, gain, move))
    if len(buys) < 2:
        return None
    picked = _Knapsack(buys, slack, state, cover=False).pick(slack)
    if len(picked) < 2:
        return None
    trial = state.copy()
    _apply_fitting(trial, goal, [move for _, _, move in picked])
    return trial


def _apply_fitting(state: PlanState, goal: Goal, moves: Sequence[Move]) -> None:
    """Apply each of ``moves`` that still gains and fits (earlier ones may have changed it)."""
    for move in moves:
        result = state.simulate(move)
        if result is None or goal.gain(*result[:3]) <= 0:
            continue
        if goal.fits(state.bytes + result[0], state.time + result[1]):
            state.apply(move)


def _compound(
    state: PlanState, goal: Goal, moves: list[tuple[Move, int, float, float]], stop_at: float, depth: int
) -> PlanState | None:
    """The best plan a compound move reaches, if better than ``state``: either one buying move (too big
    to fit) and the freeing moves that pay for it at the least loss, or one freeing move and the buying
    moves that fill the room it makes at the most gain; then a search of ``depth``.

    Knapsacks over the moves of ``state`` estimate what each compound gains; the most promising are
    then applied for real (moves interact), paid for by :func:`_settle` where they still overshoot."""
    slack = goal.limit - goal.cost(state.bytes, state.time)
    buys, frees = [], []
    for move, db, dt, dp in moves:
        cost, gain = goal.cost(db, dt), goal.gain(db, dt, dp)
        if gain > 0 and cost > 0:
            buys.append((cost, gain, move))
        elif cost < 0:
            frees.append((-cost, max(-gain, 0.0), move))
    if not buys or not frees:
        return None
    cover = _Knapsack(frees, max(cost for cost, _, _ in buys) - slack, state, cover=True)
    pack = _Knapsack(buys, slack + max(freed for freed, _, _ in frees), state, cover=False)
    # Estimates only (moves interact, and one may open cheaper ones), so the best few are tried even if
    # they look a loss.
    ranked = [(cover.value(cost - slack) - gain, move, None) for cost, gain, move in buys]
    ranked += [(loss - pack.value(slack + freed), move, slack + freed) for freed, loss, move in frees]
    ranked.sort(key=lambda r: r[0])
    current = goal.key_of(state)
    best: tuple[tuple[float, float], PlanState] | None = None
    for _, first, room in ranked[:_TRIALS]:
        trial = state.copy()
        trial.apply(first)
        if room is not None:
            _apply_fitting(trial, goal, [move for _, _, move in pack.pick(room)])
        trial = _settle(trial, goal, keep=first[0], stop_at=stop_at)
        if goal.fits_state(trial):
            trial = local_search(trial, goal, work=int(stop_at - trial.work), depth=depth)
        key = goal.key_of(trial)
        if goal.fits_state(trial) and key < current and (best is None or key < best[0]):
            best = (key, trial)
        if state.work > stop_at:
            break
    return None if best is None else best[1]


def _settle(
    state: PlanState,
    goal: Goal,
    *,
    keep: int = -1,
    stop_at: float = math.inf,
) -> PlanState:
    """Bring a plan past the limit back within it, leaving node ``keep`` alone. Each step solves a
    knapsack for the freeing moves that free enough at the least loss and applies the one of them that
    loses least per unit freed (then solves again: a move may open cheaper ones, e.g. on its inputs);
    with no such set, the move that frees the most per unit lost. May change ``state``."""
    for _ in range(_FREE_STEPS):
        over = goal.cost(state.bytes, state.time) - goal.limit
        if over <= 0 or state.work > stop_at:
            break
        frees = []
        for move, db, dt, dp in _simulated(state, skip=keep):
            cost = goal.cost(db, dt)
            if cost < 0:
                frees.append((-cost, max(-goal.gain(db, dt, dp), 0.0), move))
        if not frees:
            break
        picked = _Knapsack(frees, over, state, cover=True).pick(over) or frees
        state.apply(min(picked, key=lambda f: f[1] / f[0])[2])
    return state


class _Knapsack:
    """A multiple-choice knapsack over moves, at most one per node, by dynamic programming on a grid of
    ``_CELLS`` steps up to ``size``. Items are ``(amount, value, move)``.

    ``cover``: the least total value (a loss) of items whose amounts add up to at least ``x``. Amounts
    are rounded to the nearest step (rounding them down would miss the tight sets that matter), so a
    pick is an estimate its caller checks move by move. Else: the most total value (a gain) of items
    whose amounts add up to at most ``x``; amounts are rounded up, so the pick fits. Either way only as
    far as the moves' effects add up (moves on distinct, unrelated nodes)."""

    def __init__(self, items: Sequence[tuple[float, float, Move]], size: float, state: PlanState, *, cover: bool):
        by_node: dict[int, list[tuple[float, float, Move]]] = {}
        for item in items:
            by_node.setdefault(item[2][0], []).append(item)
        self.cover = cover
        self.unit = max(size, 1e-300) / _CELLS
        self.groups = list(by_node.values())
        # dp[x]: the best total at x steps, as a loss (a gain is negated)
        dp = np.full(_CELLS + 1, math.inf) if cover else np.zeros(_CELLS + 1)
        dp[0] = 0.0
        self.choices, self.steps = [], []
        for options in self.groups:
            best, choice = dp.copy(), np.full(_CELLS + 1, -1, dtype=np.int16)
            steps = [self._step(amount) for amount, _, _ in options]
            for k, ((_, value, _), step) in enumerate(zip(options, steps, strict=True)):
                if (cover and step <= 0) or step > _CELLS:
                    continue
                cand = np.empty_like(dp)
                # covering x with this item leaves x - step to cover; filling x leaves x - step of room
                cand[:step] = value if cover else math.inf
                cand[step:] = (value if cover else -value) + dp[: _CELLS + 1 - step]
                better = cand < best
                best[better] = cand[better]
                choice[better] = k
            dp = best
            self.choices.append(choice)
            self.steps.append(steps)
        self.dp = dp
        state.meter[0] += _CELL_WORK * len(items)

    def _step(self, amount: float) -> int:
        steps = amount / self.unit
        if self.cover:
            return min(round(steps), _CELLS)
        return math.ceil(steps * (1 - 1e-9)) if steps <= _CELLS else _CELLS + 1

    def _cell(self, x: float) -> int | None:
        cells = x / self.unit
        if self.cover:
            return max(round(cells), 0) if cells <= _CELLS + 0.5 else None
        return min(int(cells * (1 + 1e-9)), _CELLS) if cells >= 0 else None

    def value(self, x: float) -> float:
        """The least loss covering ``x`` (``inf``: none does), or the most gain within ``x``."""
        cell = self._cell(x)
        if cell is None:
            return math.inf if self.cover else 0.0
        return float(self.dp[cell]) if self.cover else -float(self.dp[cell])

    def pick(self, x: float) -> list[tuple[float, float, Move]]:
        """The items of the best choice for ``x`` (empty if none covers it)."""
        cell = self._cell(x)
        if cell is None or not math.isfinite(self.dp[cell]):
            return []
        picked = []
        for g in reversed(range(len(self.groups))):
            k = int(self.choices[g][cell])
            if k >= 0:
                picked.append(self.groups[g][k])
                cell = max(cell - self.steps[g][k], 0)
        return picked


# ---------------------------------------------------------------------------------------------------------
# Refining the min-cut solver's bracket
# ---------------------------------------------------------------------------------------------------------


def refine_bracket(
    problem: Problem,
    feasible: Mapping[str, str | None],
    infeasible: Mapping[str, str | None] | None,
    formats: frozenset[str],
    *,
    by_time: bool,
    price: float | None = None,
    others: Sequence[Mapping[str, str | None]] = (),
    work: int | None = None,
) -> dict[str, str | None]:
    """A plan at least as good as ``feasible`` (which must meet the problem's budget), the best of local
    searches from: the best plan of the group-by-group path from ``feasible`` to ``infeasible``;
    ``infeasible`` brought within the limit; and the ``_STARTS`` plans of ``others`` (other plans the
    price search met) nearest the limit, likewise. ``price``: the search's price, which picks the format
    of a node a move must save (see :class:`fxmem.solve.moves._Graph`). ``work``: the search's effort
    in node visits (default: ``_WORK_PER_NODE`` per needed node, at most ``DEFAULT_WORK``)."""
    if work is None:
        work = min(DEFAULT_WORK, _WORK_PER_NODE * len(problem.needed()))
    goal = Goal(by_time, problem.max_added_s if by_time else problem.budget_bytes)
    state = PlanState(problem, formats, feasible, price=price)
    if not goal.fits_state(state):
        return dict(feasible)
    end_at = state.work + work
    starts = [state]
    if infeasible is not None:
        end = PlanState(problem, formats, infeasible, graph=state.graph)
        starts = [_bracket_path(problem, state, end, goal, formats, work // 8), end]
    near = sorted(
        (PlanState(problem, formats, other, graph=state.graph) for other in others),
        key=lambda s: abs(goal.cost(s.bytes, s.time) - goal.limit),
    )
    starts += near[:_STARTS]
    best = state
    explored: set[frozenset[tuple[int, str | None]]] = set()  # starts often meet on the way to an optimum
    for k, start in enumerate(starts):
        # Half of what is left for each start (all of it for the last): the first, most promising,
        # get the most on a large graph; on a small one each stops at its local optimum long before.
        left = end_at - state.work
        stop_at = state.work + (left if k == len(starts) - 1 else left // 2)
        start = _settle(start.copy(), goal, stop_at=stop_at)
        if goal.fits_state(start):
            start = local_search(start, goal, work=int(stop_at - state.work), explored=explored)
            if goal.key_of(start) < goal.key_of(best):
                best = start
    return best.saved_names()


def _bracket_path(
    problem: Problem, start: PlanState, end: PlanState, goal: Goal, formats: frozenset[str], work: int
) -> PlanState:
    """Group the nodes whose decisions differ between ``start`` and ``end`` into connected groups; move
    them one group at a time from ``start`` to ``end``, best ratio first, and also move all but the
    groups a knapsack picks as the cheapest to leave behind; return the best plan that fits."""
    a, z = start.saved_names(), end.saved_names()
    differ = [n.name for n in problem.nodes if a.get(n.name, REMOVED) != z.get(n.name, REMOVED)]
    if not differ:
        return start
    parent = {v: v for v in differ}

    def root(v: str) -> str:
        while parent[v] != v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        return v

    for v in differ:
        for u in problem.by_name[v].inputs:
            if u in parent:
                parent[root(u)] = root(v)
    groups: dict[str, list[str]] = {}
    for v in differ:
        groups.setdefault(root(v), []).append(v)

    def moved(base: Mapping[str, str | None], group: list[str]) -> dict[str, str | None]:
        out = dict(base)
        for v in group:
            if v in z:
                out[v] = z[v]
            else:
                out.pop(v, None)
        return out

    def state_of(saved: Mapping[str, str | None]) -> PlanState | None:
        try:
            return PlanState(problem, formats, saved, graph=start.graph)
        except ValueError:
            return None

    # Rank the groups by what each changes node by node (bytes and time of its own decisions; exact
    # unless moving it alone changes what the backward reaches elsewhere), then walk the path exactly.
    def own(state: PlanState, i: int) -> tuple[float, float, float]:
        if i in state.saved:
            return state.options[i][state.saved[i]]
        return (0.0, state.recompute_s[i], 0.0) if state.count[i] > 0 else (0.0, 0.0, 0.0)

    ranked = []
    for k, group in enumerate(groups.values()):
        db = dt = dp = 0.0
        for v in group:
            i = start.index[v]
            (b0, t0, p0), (b1, t1, p1) = own(start, i), own(end, i)
            db, dt, dp = db + b1 - b0, dt + t1 - t0, dp + p1 - p0
        gain, cost = goal.gain(db, dt, dp), goal.cost(db, dt)
        ranked.append((-(gain / cost if cost > 0 else math.inf) if gain > 0 else math.inf, k, group, gain, cost))
    ranked.sort(key=lambda r: (r[0], r[1]))
    best, best_key = start, goal.key_of(start)

    def consider(s: PlanState | None) -> bool:
        nonlocal best, best_key
        if s is None or not goal.fits_state(s):
            return False
        if goal.key_of(s) < best_key:
            best, best_key = s, goal.key_of(s)
        return True

    current = a
    misses, spent = 0, 0
    for _, _, group, _, _ in ranked:
        current = moved(current, group)
        spent += 2 * len(problem.nodes)
        misses = 0 if consider(state_of(current)) else misses + 1
        if misses >= _PATH_MISSES or spent > work:
            break
    # The knapsack: from ``end``, leave behind the groups that free its excess at the least loss.
    useful = [(cost, gain, (k, None)) for _, k, _, gain, cost in ranked if gain > 0 and cost > 0]
    over = goal.cost(start.bytes, start.time) + sum(r[4] for r in ranked if r[3] > 0) - goal.limit
    if over > 0 and useful:
        left = {item[2][0] for item in _Knapsack(useful, over, start, cover=True).pick(over)}
        current = a
        for _, k, group, gain, _ in ranked:
            if k not in left and gain > 0:
                current = moved(current, group)
        consider(state_of(current))
    start.meter[0] += spent
    return best
