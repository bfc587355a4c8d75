"""Choosing plans by their simulated peak (fxmem.peaks), on stand-in plans: each "plan" holds the bytes it
was asked to hold, with a peak and an added time given as functions of those bytes."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from fxmem.peaks import PEAK_LADDER, climb, fit_peak

FEWEST = 100.0  # what the stand-in plan made with no budget holds
CEILING = 10_000.0


def _planner(peak, added=lambda held: 0.0):
    """``plan_at`` for stand-in plans, and the list of what it was asked for (None: no budget)."""
    asked: list[float | None] = []

    def plan_at(held: float | None) -> SimpleNamespace:
        asked.append(held)
        held = FEWEST if held is None else min(held, CEILING)
        return SimpleNamespace(
            plan=SimpleNamespace(saved_bytes=held, added_s=added(held)),
            timeline=SimpleNamespace(peak_bytes=peak(held)),
        )

    return plan_at, asked


def test_the_fewest_bytes_stand_when_holding_more_raises_the_peak():
    plan_at, asked = _planner(peak=lambda held: 1000 + held)
    fewest = plan_at(None)
    chosen, tried = climb(plan_at, fewest, CEILING, max_added_s=1.0)
    assert chosen is fewest
    assert tried == 1 and asked == [None, 2 * FEWEST]  # one plan tried: most graphs pay one more planning


def test_holding_more_is_taken_while_the_peak_falls_then_halfway_is_tried():
    """A peak lowest at 300 bytes: 200 is taken, 400 is not, and 283 (halfway by ratio) is."""
    plan_at, asked = _planner(peak=lambda held: 1000 + abs(held - 300))
    chosen, tried = climb(plan_at, plan_at(None), CEILING, max_added_s=1.0)
    assert asked[1:] == [200, 400, pytest.approx(math.sqrt(200 * 400))]
    assert tried == 3
    assert chosen.plan.saved_bytes == pytest.approx(math.sqrt(200 * 400))
    assert chosen.timeline.peak_bytes < 1100


def test_the_climb_keeps_within_the_added_time_and_the_ceiling():
    # The peak falls all the way up, but holding 800 bytes or more would cost too much time.
    plan_at, asked = _planner(peak=lambda held: 1e8 / held, added=lambda held: 2.0 if held >= 800 else 0.5)
    chosen, _ = climb(plan_at, plan_at(None), CEILING, max_added_s=1.0)
    assert chosen.plan.saved_bytes == pytest.approx(math.sqrt(400 * 800))
    # With time to spare it stops at the ceiling, having asked for no more.
    plan_at, asked = _planner(peak=lambda held: 1e8 / held)
    chosen, _ = climb(plan_at, plan_at(None), CEILING, max_added_s=1.0)
    assert chosen.plan.saved_bytes == CEILING
    assert max(a for a in asked if a is not None) == CEILING


def test_a_step_that_gains_little_is_taken_and_ends_the_search():
    """Each plan tried costs a planning: one that lowers the peak by under 5% is the last tried."""
    plan_at, asked = _planner(peak=lambda held: 100_000 - held)  # 100 bytes off a 99,900-byte peak
    chosen, tried = climb(plan_at, plan_at(None), CEILING, max_added_s=1.0)
    assert tried == 1 and chosen.plan.saved_bytes == 2 * FEWEST


def test_a_plan_with_nothing_held_climbs_from_a_share_of_the_ceiling():
    plan_at, asked = _planner(peak=lambda held: 1000 + held)
    fewest = plan_at(0.0)
    climb(plan_at, fewest, CEILING, max_added_s=1.0)
    assert asked[1] > 0


def test_an_absolute_budget_at_the_peak_of_the_plan_made_with_no_budget_is_met():
    """The rungs of the ladder all peak higher than the plan made with no budget, which holds more than
    its fewest bytes (it climbed): a budget at its peak is met with it."""
    rung_peak = 5000
    plan_at, asked = _planner(peak=lambda held: rung_peak)
    unbudgeted = SimpleNamespace(plan=SimpleNamespace(saved_bytes=300.0, added_s=0.0),
                                 timeline=SimpleNamespace(peak_bytes=1200))  # fmt: skip
    chosen = fit_peak(plan_at, lambda: unbudgeted, budget=1200, reference=1000)
    assert chosen is unbudgeted
    # It is tried at its place by the bytes it holds: after the rungs holding more than 300 of 1000.
    assert asked == [PEAK_LADDER[0], *(f * 1000 for f in PEAK_LADDER[1:] if f * 1000 >= 300)]
    # A budget below every peak: the lowest peak, with the reason left to the caller.
    assert fit_peak(plan_at, lambda: unbudgeted, budget=10, reference=1000) is unbudgeted
