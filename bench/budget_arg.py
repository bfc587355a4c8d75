"""The ``--budgets`` argument of the benchmark scripts: fractions, or ``none`` for fxmem's default (no
budget). Standard library only, so that a script timing a cold first call imports nothing more with it."""

from __future__ import annotations


def fraction_or_none(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def budget_text(budget: float | None) -> str:
    return "none" if budget is None else f"{budget:.2f}"
