"""Solvers by name: ``@register_solver("name")`` on a function ``(problem, formats, bits) -> Plan``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fxmem.solve.problem import Plan

SolverFn = Callable[..., "Plan"]
_SOLVERS: dict[str, SolverFn] = {}
DEFAULT_SOLVER = "mincut"


def register_solver(name: str) -> Callable[[SolverFn], SolverFn]:
    """Register ``fn(problem, formats=(), bits=None) -> Plan`` under ``name``."""

    def decorate(fn: SolverFn) -> SolverFn:
        if name == "auto":
            raise ValueError("solver: 'auto' is reserved for the default solver")
        _SOLVERS[name] = fn
        return fn

    return decorate


def get_solver(name: str) -> SolverFn:
    if name == "auto":
        name = DEFAULT_SOLVER
    try:
        return _SOLVERS[name]
    except KeyError:
        raise ValueError(f"solver: unknown solver {name!r}; known: auto, {', '.join(sorted(_SOLVERS))}") from None


def available_solvers() -> tuple[str, ...]:
    return tuple(sorted(_SOLVERS))
