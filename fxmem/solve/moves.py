"""Moves on plans: the state both the greedy baseline and the min-cut solver's refinement work on.

A plan is a saved set (node -> format); the backward recomputes whatever it reaches that is not saved.
:class:`PlanState` keeps, for each node, how many reasons the backward has to reach it (it is required,
or a recomputed user reads it), so the effect of one *move* -- save a recomputed node, recompute a saved
one, or store a saved one in another format -- costs only the nodes it touches, and saved nodes the
backward no longer reaches are dropped on the way. The search itself is in :mod:`fxmem.solve.refine`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from fxmem.solve.problem import Problem

_DROP = "__recompute__"  # a move's target meaning "stop saving it: recompute it"
# "recompute it, saving its inputs the backward did not reach yet" (rather than recomputing them in
# turn): one move for what otherwise takes two, the first of which alone may cost too much to be tried
_DROP_SAVING = "__recompute_saving_inputs__"
# "save each recomputed node that reads it, so that nothing reaches it": two saves that together stop
# recomputing an expensive input each gain little alone
_SAVE_READERS = "__save_readers__"
REMOVED = object()  # in a move's changes: the node is no longer saved


class _Graph:
    """What moves need to know about a problem's nodes, by index, for one set of admitted formats.

    A move that must save a node it did not choose (an input that cannot be recomputed, or one a
    ``_DROP_SAVING`` move saves) saves it in the format cheapest at ``price`` (bytes per second: the
    min-cut's exchange rate between held bytes and added time), or at full precision without one."""

    def __init__(self, problem: Problem, formats: frozenset[str], price: float | None = None) -> None:
        self.problem = problem
        self.formats = formats
        self.price = price
        self.meter = [0]  # node visits by every state on this graph: what bounds a search's work
        self.names = [n.name for n in problem.nodes]
        self.index = index = {name: i for i, name in enumerate(self.names)}
        self.inputs = [tuple(dict.fromkeys(index[i] for i in n.inputs)) for n in problem.nodes]
        self.users: list[list[int]] = [[] for _ in self.names]
        for v, inputs in enumerate(self.inputs):
            for u in inputs:
                self.users[u].append(v)
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
        self.forced: list[str | None] = [None] * len(self.options)
        if price is not None:
            for i, opts in enumerate(self.options):
                if opts:
                    self.forced[i] = min(opts, key=lambda f, o=opts: o[f][0] + price * (o[f][1] + o[f][2]))


class PlanState:
    """A valid saved set over the nodes the backward reaches, with its held bytes, added time and the
    precision penalty of its quantized formats (which solvers minimise with the time but never report).

    Raises ``ValueError`` if ``saved`` leaves a needed node that can be neither saved nor recomputed, or
    names a format not admitted. ``price``: see :class:`_Graph`. Pass ``graph`` instead to share the
    per-problem tables and the work meter between states."""

    def __init__(
        self,
        problem: Problem,
        formats: frozenset[str],
        saved: Mapping[str, str | None],
        *,
        graph: _Graph | None = None,
        price: float | None = None,
    ) -> None:
        if graph is None:
            graph = _Graph(problem, formats, price)
        elif graph.problem is not problem or graph.formats != formats or price not in (None, graph.price):
            raise ValueError("graph: built for another problem, formats or price")
        self.graph = graph
        self.problem = problem
        self.names, self.index, self.inputs, self.users = graph.names, graph.index, graph.inputs, graph.users
        self.required, self.can_recompute, self.recompute_s = graph.required, graph.can_recompute, graph.recompute_s
        self.options, self.forced = graph.options, graph.forced
        index = self.index
        self.meter = graph.meter
        self.count = [0] * len(self.names)
        self.saved: dict[int, str | None] = {}
        # move -> (what simulate returned, the nodes whose state it read, its work): a move's outcome
        # holds until a move changes one of those nodes (see apply)
        self.memo: dict[tuple[int, str | None], tuple[Any, set[int], int]] = {}
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
        """Every move from this plan: ``(node, fmt)`` saves or re-formats it, ``(node, _DROP)`` recomputes it,
        ``(node, _DROP_SAVING)`` recomputes it and saves its inputs not reached yet (where that differs),
        ``(node, _SAVE_READERS)`` saves the recomputed nodes that read it (where there are several)."""
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
                    if any(self.count[u] <= 0 and self.options[u] for u in self.inputs[i]):
                        yield i, _DROP_SAVING
            else:
                for fmt in self.options[i]:
                    yield i, fmt
                if not self.required[i] and c >= 2:
                    yield i, _SAVE_READERS

    def simulate(self, move: tuple[int, str | None]) -> tuple[int, float, float, dict[int, int], dict[int, Any]] | None:
        """``(delta bytes, delta time, delta penalty, new counts, new saved entries)`` of ``move``, or
        ``None`` if it leaves a needed node that can be neither saved nor recomputed (or no longer
        applies). Does not change the state. A move simulated before, on nodes no move has changed
        since, is answered from the memo and charged the same work, so the search runs as it would
        without the memo, only faster."""
        known = self.memo.get(move)
        if known is not None:
            self.meter[0] += known[2]
            return known[0]
        counts: dict[int, int] = {}
        changes: dict[int, Any] = {}
        started = self.meter[0]
        result = self._walk(move, counts, changes)
        read = {move[0], *counts, *changes}
        if move[1] == _SAVE_READERS:
            read.update(self.users[move[0]])
        self.memo[move] = (result, read, self.meter[0] - started)
        return result

    def _walk(
        self, move: tuple[int, str | None], counts: dict[int, int], changes: dict[int, Any]
    ) -> tuple[int, float, float, dict[int, int], dict[int, Any]] | None:
        """``simulate``'s walk, filling ``counts`` with every node it reaches (and reads)."""
        i, target = move
        db, dt, dp = 0, 0.0, 0.0
        count, saved, options = self.count, self.saved, self.options
        work = 3  # a call costs about three node visits on its own
        # A move ranked on an earlier state may no longer apply.
        if count[i] <= 0:
            return None
        dropping = target in (_DROP, _DROP_SAVING)
        if dropping:
            if i not in saved or not self.can_recompute[i]:
                return None
        elif target == _SAVE_READERS:
            if i in saved or self.required[i]:
                return None
        elif target not in options[i] or (i in saved and saved[i] == target):
            return None

        if i in saved and not dropping:  # another format
            b0, t0, p0 = options[i][saved[i]]
            b1, t1, p1 = options[i][target]
            self.meter[0] += work
            return b1 - b0, t1 - t0, p1 - p0, counts, {i: target}

        if i in saved:  # recompute it: its inputs become reached
            b0, t0, p0 = options[i][saved[i]]
            db -= b0
            dt += self.recompute_s[i] - t0
            dp -= p0
            changes[i] = REMOVED
            stack = []
            for u in self.inputs[i]:
                if target == _DROP_SAVING and count[u] <= 0 and options[u]:
                    counts[u] = 1
                    b1, t1, p1 = options[u][self.forced[u]]
                    db, dt, dp = db + b1, dt + t1, dp + p1
                    changes[u] = self.forced[u]
                else:
                    stack.append(u)
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
                elif options[u]:
                    b1, t1, p1 = options[u][self.forced[u]]
                    db, dt, dp = db + b1, dt + t1, dp + p1
                    changes[u] = self.forced[u]
                else:
                    self.meter[0] += work
                    return None
        else:  # save it (or its recomputed readers): their inputs lose a reader
            if target == _SAVE_READERS:
                targets = [(w, self.forced[w]) for w in self.users[i] if count[w] > 0 and w not in saved]
                work += len(self.users[i])
                if any(not options[w] for w, _ in targets):
                    self.meter[0] += work
                    return None
            else:
                targets = [(i, target)]
            stack = []
            for w, fmt in targets:
                b1, t1, p1 = options[w][fmt]
                db, dt, dp = db + b1, dt + t1 - self.recompute_s[w], dp + p1
                changes[w] = fmt
                stack.extend(self.inputs[w])
            while stack:
                u = stack.pop()
                work += 1
                c = counts.get(u, count[u]) - 1
                counts[u] = c
                if c > 0:
                    continue
                if u in saved or u in changes:  # no longer reached: no longer saved
                    b0, t0, p0 = options[u][saved[u] if u in saved else changes[u]]
                    db -= b0
                    dt -= t0
                    dp -= p0
                    if u in saved:
                        changes[u] = REMOVED
                    else:
                        del changes[u]
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
            if fmt is REMOVED:
                self.saved.pop(u, None)
            else:
                self.saved[u] = fmt
        changed = counts.keys() | changes.keys()
        self.memo = {m: known for m, known in self.memo.items() if known[1].isdisjoint(changed)}
        return True

    @property
    def work(self) -> int:
        return self.meter[0]

    def copy(self) -> PlanState:
        other = object.__new__(PlanState)
        other.__dict__.update(self.__dict__)
        other.count = list(self.count)
        other.saved = dict(self.saved)
        other.memo = dict(self.memo)
        return other

    def saved_names(self) -> dict[str, str | None]:
        return {self.names[i]: fmt for i, fmt in self.saved.items()}


# ---------------------------------------------------------------------------------------------------------
# Limits: minimise time under a byte limit, or bytes under a time limit
# ---------------------------------------------------------------------------------------------------------


class Goal:
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
