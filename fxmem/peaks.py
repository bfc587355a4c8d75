"""Choosing among plans by their simulated peak.

The peak is not monotonic in the bytes a plan holds: recomputing more makes larger transients in the
backward, and under Inductor the recomputation of many layers can fuse into early kernels of the backward,
where all of it is live at once. Both searches here take ``plan_at(held)``: a fresh plan holding at most
``held`` bytes with the least added time, or, for ``held=None``, the plan made with no budget (the fewest
bytes within the added time no budget allows). Each call costs about a whole planning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Protocol

from fxmem.simulate import Timeline
from fxmem.solve import Plan

__all__ = ["PEAK_LADDER", "climb", "fit_peak"]

# The plans tried in turn to bring the simulated peak under an absolute budget: the least-time plan
# (``inf``: no limit on held bytes), then plans holding fractions of what torch.compile's default holds
# (of what the least-time plan holds, without the default). None depends on the budget.
PEAK_LADDER = (math.inf, 1.0, 0.7, 0.5, 0.35, 0.25, 0.17, 0.11, 0.07, 0.04, 0.02, 0.0)
# With no budget, plans holding more than the fewest bytes are tried from this share of the default's up.
_CLIMB_FLOOR = 0.01
# The least share of the peak a step of that search must take off for the next to be tried.
_WORTH_A_STEP = 0.05


class Attempt(Protocol):
    plan: Plan
    timeline: Timeline


def fit_peak(
    plan_at: Callable[[float | None], Attempt], unbudgeted: Callable[[], Attempt], budget: int, reference: int | None
) -> Attempt:
    """An absolute budget bounds the simulated peak. Try the plans of ``PEAK_LADDER``, holding ever fewer
    bytes in an order no budget changes, and take the first whose peak fits: the least added time among
    them, and a smaller budget can only move the choice later in the order, to a plan whose peak is no
    larger. None fits: the lowest peak. The plan made with no budget (``unbudgeted()``) takes its place in
    that order by the bytes it holds: its peak can be lower than that of a plan which holds as much by
    recomputing other nodes (ViT small on an H200: 1261 MiB predicted against 1370), and a budget at its
    peak is so always met."""
    first = plan_at(PEAK_LADDER[0])
    if first.timeline.peak_bytes <= budget:
        return first
    scale = reference or first.plan.saved_bytes
    best = first
    for attempt in _ladder(plan_at, scale, unbudgeted()):
        if attempt.timeline.peak_bytes <= budget:
            return attempt
        if attempt.timeline.peak_bytes < best.timeline.peak_bytes:
            best = attempt
    return best


def _ladder(plan_at: Callable[[float | None], Attempt], scale: float, unbudgeted: Attempt) -> Iterator[Attempt]:
    """The plans after the first rung, each planned only when asked for, with ``unbudgeted`` before the
    first rung that may hold fewer bytes than it does."""
    pending: Attempt | None = unbudgeted
    for fraction in PEAK_LADDER[1:]:
        if pending is not None and fraction * scale < pending.plan.saved_bytes:
            yield pending
            pending = None
        yield plan_at(fraction * scale)
    if pending is not None:
        yield pending


def climb(
    plan_at: Callable[[float | None], Attempt], unbudgeted: Attempt, ceiling: float, max_added_s: float
) -> tuple[Attempt, int]:
    """The plan made with no budget, or one holding more bytes with a lower peak, and how many plans were
    tried. The fewest bytes can peak highest (ViT small on an H200: the fewest, 139 MiB, peaked at
    1984 MiB; a plan holding 302 MiB at 1205 MiB, and ran faster). Plans holding twice the bytes, then twice
    again up to ``ceiling``, each the least added time within them, replace it while their peak falls and
    their added time stays within ``max_added_s``; once one does not, the plan halfway between (by ratio)
    is tried, where the lowest peak may lie. A step that lowers the peak by less than ``_WORTH_A_STEP`` is
    taken and ends the search: each plan tried costs about a planning (GPT-2 small, Inductor: the first
    took 4% off, a second and a third found nothing more; 3.0 s of planning, 1.7 s with this rule)."""
    best, tried = unbudgeted, 0

    def lower(held: float) -> Attempt | None:
        nonlocal tried
        tried += 1
        attempt = plan_at(held)
        fits = attempt.plan.added_s <= max_added_s and attempt.timeline.peak_bytes < best.timeline.peak_bytes
        return attempt if fits else None

    held = max(unbudgeted.plan.saved_bytes, _CLIMB_FLOOR * ceiling)
    gained = 1.0  # the share of the peak the last plan taken took off
    while held < ceiling and gained >= _WORTH_A_STEP:
        step = min(2 * held, ceiling)
        attempt = lower(step)
        if attempt is None:
            if best is not unbudgeted:
                best = lower(math.sqrt(held * step)) or best
            break
        gained = 1 - attempt.timeline.peak_bytes / best.timeline.peak_bytes
        best, held = attempt, step
    return best, tried
