"""Solvers: torch-free. A ``Problem`` of plain numbers in, a ``Plan`` out."""

from fxmem.solve import greedy as _greedy  # noqa: F401  (registers "greedy")
from fxmem.solve import ilp as _ilp  # noqa: F401  (registers "ilp")
from fxmem.solve import mincut as _mincut  # noqa: F401  (registers "mincut")
from fxmem.solve.problem import Decision, Plan, Problem, QuantOption, SolverNode, evaluate
from fxmem.solve.registry import available_solvers, get_solver, register_solver

__all__ = [
    # problem and result
    "Decision",
    "Plan",
    "Problem",
    "QuantOption",
    "SolverNode",
    "evaluate",
    # registry
    "available_solvers",
    "get_solver",
    "register_solver",
]
