"""Moves on plans: the state both the greedy baseline and the min-cut solver's refinement work on.

A plan is a saved set (node -> format); the backward recomputes whatever it reaches that is not saved.
:class:`PlanState` keeps, for each node, how many reasons the backward has to reach it (it is required,
or a recomputed user reads it), so the effect of one *move* -- save a recomputed node, recompute a saved
one, or store a saved one in another format -- costs only the nodes it touches, and saved nodes the
backward no longer reaches are dropped on the way.

:func:`refine_bracket`: the min-cut solver's bisection ends between a plan that meets the budget and
one just past it, two neighbouring vertices of the lower convex hull of (bytes, time) trade-offs.
Budgets between them are not reachable by any price (the Lagrangian duality gap), so the solver then
(1) moves from the feasible plan towards the infeasible one a connected group of differing nodes at a
time, in order of the time each group buys per byte, keeping the best plan that fits; and (2) runs a
local search from there: the best single move that fits, else the best *ejection chain* -- one move
that buys time (too big to fit) followed by the moves that free bytes most cheaply until it fits.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from fxmem.solve.problem import Problem

_DROP = "__recompute__"  # a move's target meaning "stop saving it: recompute it"
_REMOVED = object()
# Local-search effort, in node visits (a visit is ~1 µs of Python): bounds the refinement of large graphs.
DEFAULT_WORK = 3_000_000
_EJECTIONS = 8  # buying moves tried per ejection round
_EJECTION_STEPS = 24  # freeing moves at most per ejection chain
_PATH_MISSES = 8  # the group-by-group path stops after this many plans in a row that do not fit


class _Graph:
    """What moves need to know about a problem's nodes, by index, for one set of admitted formats."""

    def __init__(self, problem: Problem, formats: frozenset[str]) -> None:
        self.problem = problem
        self.formats = formats
        self.names = [n.name for n in problem.nodes]
        self.index = index = {name: i for i, name in enumerate(self.names)}
        self.inputs = [tuple(dict.fromkeys(index[i] for i in n.inputs)) for n in problem.nodes]
        self.required = [n.required for n in problem.nodes]
        self.can_recompute = [n.can_recompute for n in problem.nodes]
        self.recompute_s = [n.recompute_s for n in problem.nodes]
        # fmt -> (bytes held, seconds added, seconds of precision penalty)
        self.options: list[dict[str | None, tuple[int, float, float]]] = []
        for n in problem.nodes:
            opts: dict[str | None, tuple[int, float, float]] = {}
            if n.can_save:
                opts[None] = (n.save_bytes, 0.0, 0.0)
                for o in n.quant_options:
                    if o.fmt in formats:
                        opts[o.fmt] = (o.stored_bytes, o.added_s, o.penalty_s)
            self.options.append(opts)


class PlanState:
    """A valid saved set over the nodes the backward reaches, with its held bytes, added time and the
    precision penalty of its quantized formats (which solvers minimise with the time but never report).

    Raises ``ValueError`` if ``saved`` leaves a needed node that can be neither saved nor recomputed, or
    names a format not admitted. Pass ``graph`` to share the per-problem tables between states."""

    def __init__(
        self,
        problem: Problem,
        formats: frozenset[str],
        saved: Mapping[str, str | None],
        *,
        graph: _Graph | None = None,
    ) -> None:
        if graph is None or graph.problem is not problem or graph.formats != formats:
            graph = _Graph(problem, formats)
        self.graph = graph
        self.problem = problem
        self.names, self.index, self.inputs = graph.names, graph.index, graph.inputs
        self.required, self.can_recompute, self.recompute_s = graph.required, graph.can_recompute, graph.recompute_s
        self.options = graph.options
        index = self.index
        self.meter = [0]  # node visits, shared with copies
        self.count = [0] * len(self.names)
        self.saved: dict[int, str | None] = {}
        self.bytes = 0
        self.time = 0.0
        self.penalty = 0.0
        wanted = {index[name]: fmt for name, fmt in saved.items()}
        # Walk from the required nodes, through the ones not saved, counting who reaches whom.
        order = [i for i in range(len(self.names)) if self.required[i]]
        for i in order:
            self.count[i] += 1
        stack = list(order)
        seen: set[int] = set()
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            if i in wanted:
                fmt = wanted[i]
                if fmt not in self.options[i]:
                    raise ValueError(f"{self.names[i]!r} cannot be saved as {fmt!r}")
                self.saved[i] = fmt
                b, t, p = self.options[i][fmt]
                self.bytes += b
                self.time += t
                self.penalty += p
                continue
            if not self.can_recompute[i]:
                raise ValueError(f"{self.names[i]!r} is needed but neither saved nor recomputable")
            self.time += self.recompute_s[i]
            for u in self.inputs[i]:
                self.count[u] += 1
                stack.append(u)

    # -- moves ------------------------------------------------------------------------------------------

    def moves(self) -> Iterator[tuple[int, str | None]]:
        """Every move from this plan: ``(node, fmt)`` saves or re-formats it, ``(node, _DROP)`` recomputes it."""
        for i, c in enumerate(self.count):
            if c <= 0:
                continue
            if i in self.saved:
                current = self.saved[i]
                for fmt in self.options[i]:
                    if fmt != current:
                        yield i, fmt
                if self.can_recompute[i]:
                    yield i, _DROP
            else:
                for fmt in self.options[i]:
                    yield i, fmt

    def simulate(self, move: tuple[int, str | None]) -> tuple[int, float, float, dict[int, int], dict[int, Any]] | None:
        """``(delta bytes, delta time, delta penalty, new counts, new saved entries)`` of ``move``, or
        ``None`` if it leaves a needed node that can be neither saved nor recomputed (or no longer
        applies). Does not change the state."""
        i, target = move
        counts: dict[int, int] = {}
        changes: dict[int, Any] = {}
        db, dt, dp = 0, 0.0, 0.0
        count, saved, options = self.count, self.saved, self.options
        work = 3  # a call costs about three node visits on its own
        # A move ranked on an earlier state may no longer apply.
        if count[i] <= 0:
            return None
        if target == _DROP:
            if i not in saved or not self.can_recompute[i]:
                return None
        elif target not in options[i] or (i in saved and saved[i] == target):
            return None

        if i in saved and target != _DROP:  # another format
            b0, t0, p0 = options[i][saved[i]]
            b1, t1, p1 = options[i][target]
            self.meter[0] += work
            return b1 - b0, t1 - t0, p1 - p0, counts, {i: target}

        if i in saved:  # recompute it: its inputs become reached
            b0, t0, p0 = options[i][saved[i]]
            db -= b0
            dt += self.recompute_s[i] - t0
            dp -= p0
            changes[i] = _REMOVED
            stack = list(self.inputs[i])
            while stack:
                u = stack.pop()
                work += 1
                c = counts.get(u, count[u])
                counts[u] = c + 1
                if c > 0:
                    continue
                # u was not reached: recompute it, or save it if it cannot be recomputed
                if self.can_recompute[u]:
                    dt += self.recompute_s[u]
                    stack.extend(self.inputs[u])
                elif None in options[u]:
                    db += options[u][None][0]
                    changes[u] = None
                else:
                    self.meter[0] += work
                    return None
        else:  # save it: its inputs lose a reader
            b1, t1, p1 = options[i][target]
            db += b1
            dt += t1 - self.recompute_s[i]
            dp += p1
            changes[i] = target
            stack = list(self.inputs[i])
            while stack:
                u = stack.pop()
                work += 1
                c = counts.get(u, count[u]) - 1
                counts[u] = c
                if c > 0:
                    continue
                if u in saved:  # no longer reached: no longer saved
                    b0, t0, p0 = options[u][saved[u]]
                    db -= b0
                    dt -= t0
                    dp -= p0
                    changes[u] = _REMOVED
                else:
                    dt -= self.recompute_s[u]
                    stack.extend(self.inputs[u])
        self.meter[0] += work
        return db, dt, dp, counts, changes

    def apply(self, move: tuple[int, str | None]) -> bool:
        result = self.simulate(move)
        if result is None:
            return False
        db, dt, dp, counts, changes = result
        self.bytes += db
        self.time += dt
        self.penalty += dp
        for u, c in counts.items():
            self.count[u] = c
        for u, fmt in changes.items():
            if fmt is _REMOVED:
                self.saved.pop(u, None)
            else:
                self.saved[u] = fmt
        return True

    @property
    def work(self) -> int:
        return self.meter[0]

    def copy(self) -> PlanState:
        other = object.__new__(PlanState)
        other.__dict__.update(self.__dict__)
        other.count = list(self.count)
        other.saved = dict(self.saved)
        return other

    def saved_names(self) -> dict[str, str | None]:
        return {self.names[i]: fmt for i, fmt in self.saved.items()}


# ---------------------------------------------------------------------------------------------------------
# Limits: minimise time under a byte limit, or bytes under a time limit
# ---------------------------------------------------------------------------------------------------------


class _Goal:
    """``by_time``: minimise bytes with added time <= ``limit``; else minimise time with bytes <= ``limit``.
    The objective's time includes the precision penalty; the time limit does not."""

    def __init__(self, by_time: bool, limit: float | None) -> None:
        self.by_time = by_time
        self.limit = math.inf if limit is None else float(limit)

    def fits(self, b: float, t: float) -> bool:
        return t <= self.limit * (1 + 1e-12) if self.by_time else b <= self.limit

    def key(self, b: float, t: float, p: float) -> tuple[float, float]:
        # Times are rounded to 1e-15 s so float noise in running sums cannot make a move look better.
        return (b, round(t + p, 15)) if self.by_time else (round(t + p, 15), b)

    def key_of(self, state: PlanState) -> tuple[float, float]:
        return self.key(state.bytes, state.time, state.penalty)

    def fits_state(self, state: PlanState) -> bool:
        return self.fits(state.bytes, state.time)

    def gain(self, db: float, dt: float, dp: float) -> float:
        """How much the objective improves (positive is better)."""
        return -db if self.by_time else -(dt + dp)

    def cost(self, db: float, dt: float) -> float:
        """How much of the limit it uses (negative frees some)."""
        return dt if self.by_time else db


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.inf


def local_search(state: PlanState, goal: _Goal, *, work: int = DEFAULT_WORK) -> PlanState:
    """Improve a plan that fits ``goal``: the best single move that still fits, else the best ejection
    chain (a move that improves the objective but overshoots, then the cheapest freeing moves until it
    fits again). Stops at a local optimum or after ``work`` node visits."""
    start_work = state.work
    current = goal.key_of(state)
    while state.work - start_work < work:
        evaluated = []
        best = None
        for move in state.moves():
            result = state.simulate(move)
            if result is None:
                continue
            db, dt, dp = result[0], result[1], result[2]
            b, t = state.bytes + db, state.time + dt
            key = goal.key(b, t, state.penalty + dp)
            if goal.fits(b, t) and key < current and (best is None or key < best[0]):
                best = (key, move)
            gain = goal.gain(db, dt, dp)
            if gain > 0:
                evaluated.append((-_ratio(gain, goal.cost(db, dt)), move))
        if best is not None:
            state.apply(best[1])
            current = goal.key_of(state)
            continue
        # Ejection chains from the moves that buy the most per unit of the limit they use.
        evaluated.sort(key=lambda e: e[0])
        best_state = None
        for _, move in evaluated[:_EJECTIONS]:
            trial = state.copy()
            trial.apply(move)
            trial = _free(trial, goal, keep=move[0], stop_at=start_work + work)
            key = goal.key_of(trial)
            if goal.fits_state(trial) and key < current and (best_state is None or key < best_state[0]):
                best_state = (key, trial)
            if state.work - start_work > work:
                break
        if best_state is None:
            break
        state, current = best_state[1], best_state[0]
    return state


def _free(
    state: PlanState, goal: _Goal, *, keep: int = -1, steps: int = _EJECTION_STEPS, stop_at: float = math.inf
) -> PlanState:
    """Free the limit until the plan fits, leaving node ``keep`` alone: repeatedly apply the move that
    frees it most cheaply (objective lost per unit freed), and at each step also try finishing with the
    single move that makes the plan fit at the least loss. Returns the best plan that fits, or the last
    one tried. May change ``state``. Gives up once the work meter passes ``stop_at``."""
    best: tuple[tuple[float, float], PlanState] | None = None
    for _ in range(steps):
        if goal.fits_state(state) or state.work > stop_at:
            break
        cheapest, cheapest_rank = None, math.inf
        finish, finish_key = None, None
        for move in state.moves():
            if move[0] == keep:
                continue
            result = state.simulate(move)
            if result is None:
                continue
            db, dt, dp = result[0], result[1], result[2]
            freed = -goal.cost(db, dt)
            if freed <= 0:
                continue
            rank = max(-goal.gain(db, dt, dp), 0.0) / freed
            if rank < cheapest_rank:
                cheapest, cheapest_rank = move, rank
            b, t = state.bytes + db, state.time + dt
            key = goal.key(b, t, state.penalty + dp)
            if goal.fits(b, t) and (finish_key is None or key < finish_key):
                finish, finish_key = move, key
        if finish is not None and finish_key is not None and (best is None or finish_key < best[0]):
            done = state.copy()
            done.apply(finish)
            best = (finish_key, done)
        if cheapest is None:
            break
        state.apply(cheapest)
    if goal.fits_state(state):
        key = goal.key_of(state)
        if best is None or key < best[0]:
            best = (key, state)
    return best[1] if best is not None else state


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
    work: int = DEFAULT_WORK,
) -> dict[str, str | None]:
    """A plan at least as good as ``feasible`` (which must meet the problem's budget): the best of the
    group-by-group path from ``feasible`` to ``infeasible``, then locally searched."""
    goal = _Goal(by_time, problem.max_added_s if by_time else problem.budget_bytes)
    state = PlanState(problem, formats, feasible)
    if not goal.fits_state(state):
        return dict(feasible)
    best = state
    starts = []
    if infeasible is not None:
        end = PlanState(problem, formats, infeasible, graph=state.graph)
        best = _bracket_path(problem, state, end, goal, formats, work // 4)
        # A second start: the infeasible plan, freed until it fits.
        repaired = _free(end.copy(), goal, stop_at=end.work + work // 4)
        if goal.fits_state(repaired):
            starts.append(repaired)
    best = local_search(best, goal, work=work // 2 if starts else work)
    for other in starts:
        other = local_search(other, goal, work=work // 4)
        if goal.key_of(other) < goal.key_of(best):
            best = other
    return best.saved_names()


def _bracket_path(
    problem: Problem, start: PlanState, end: PlanState, goal: _Goal, formats: frozenset[str], work: int
) -> PlanState:
    """Group the nodes whose decisions differ between ``start`` and ``end`` into connected groups; move
    them one group at a time from ``start`` to ``end``, best ratio first; return the best plan that fits."""
    a, z = start.saved_names(), end.saved_names()
    differ = [n.name for n in problem.nodes if a.get(n.name, _REMOVED) != z.get(n.name, _REMOVED)]
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
        gain = goal.gain(db, dt, dp)
        ranked.append((-_ratio(gain, goal.cost(db, dt)) if gain > 0 else math.inf, k, group))
    ranked.sort(key=lambda r: (r[0], r[1]))
    best, best_key = start, goal.key_of(start)
    current = a
    misses, spent = 0, 0
    for _, _, group in ranked:
        current = moved(current, group)
        s = state_of(current)
        spent += 2 * len(problem.nodes)
        if s is not None and goal.fits_state(s):
            misses = 0
            if goal.key_of(s) < best_key:
                best, best_key = s, goal.key_of(s)
        else:
            misses += 1
        if misses >= _PATH_MISSES or spent > work:
            break
    start.meter[0] += spent
    return best


# ---------------------------------------------------------------------------------------------------------
# The greedy baseline
# ---------------------------------------------------------------------------------------------------------
