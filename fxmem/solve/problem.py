"""The solver's world: plain numbers, no torch.

A ``Problem`` is the forward part of a training graph as seen by a solver: for each node, what it costs
to hold it until the backward (``save_bytes``, or fewer bytes in a quantized format) and what it costs to
compute it again in the backward (``recompute_s``). Nodes the backward reads are ``required``. A solver
returns a ``Plan``: which nodes the forward saves (and in which format) and which the backward recomputes.

Researchers can build problems by hand (see ``fxmem.solve.synthetic``) and run any registered solver.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

DecisionKind = Literal["keep", "recompute", "quantize"]


@dataclass(frozen=True)
class QuantOption:
    """Storing a node in ``fmt`` holds ``stored_bytes`` and adds ``added_s`` (quantize + dequantize).

    ``penalty_s`` prices the lost precision in seconds: solvers add it to the objective (not to the
    reported time), so that of two formats meeting a budget the wider one wins."""

    fmt: str
    stored_bytes: int
    added_s: float
    penalty_s: float = 0.0


@dataclass
class SolverNode:
    name: str
    inputs: tuple[str, ...] = ()
    save_bytes: int = 0
    recompute_s: float = 0.0
    can_save: bool = True
    can_recompute: bool = True
    required: bool = False
    quant_options: tuple[QuantOption, ...] = ()
    kind: str = "pointwise"

    def stored_bytes(self, fmt: str | None) -> int:
        """The bytes it holds saved in ``fmt`` (``None``: as it is)."""
        option = _option(self, fmt)
        return option.stored_bytes if option else self.save_bytes


@dataclass
class Problem:
    """Nodes in topological order (inputs before users)."""

    nodes: list[SolverNode]
    budget_bytes: float | None = None
    max_added_s: float | None = None

    def __post_init__(self) -> None:
        self.by_name = {n.name: n for n in self.nodes}
        seen: set[str] = set()
        for node in self.nodes:
            missing = [i for i in node.inputs if i not in seen]
            if missing:
                raise ValueError(f"node {node.name!r} reads {missing} before they are defined")
            seen.add(node.name)

    def all_bytes(self) -> int:
        """What every node held as it is would take: no plan holds more."""
        return sum(node.save_bytes for node in self.nodes)

    def needed(self) -> set[str]:
        """Names of the nodes the backward could possibly touch: required ones and their ancestors."""
        return {node.name for node in self.reached(lambda node: True)}

    def reached(
        self, through: Callable[[SolverNode], bool], start: Iterable[str] | None = None
    ) -> Iterator[SolverNode]:
        """Each node the backward reaches, once: the required ones (or those named in ``start``), and the
        inputs of every node reached that ``through`` accepts (one it rebuilds rather than holds)."""
        seen: set[str] = set()
        stack = [n.name for n in self.nodes if n.required] if start is None else list(start)
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            node = self.by_name[name]
            yield node
            if through(node):
                stack.extend(node.inputs)


@dataclass(frozen=True)
class Decision:
    kind: DecisionKind
    fmt: str | None = None


@dataclass
class Plan:
    """What the forward saves and what the backward recomputes.

    ``saved`` maps every saved node to ``None`` (full precision) or a quantized format; ``recomputed`` lists
    nodes recomputed in the backward. ``saved_bytes`` counts what the saved tensors hold (each node once).
    """

    saved: dict[str, str | None]
    recomputed: list[str]
    saved_bytes: int
    added_s: float
    feasible: bool = True
    solver: str = ""
    solve_time_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def decision(self, name: str) -> Decision:
        if name in self.saved:
            fmt = self.saved[name]
            return Decision("quantize", fmt) if fmt else Decision("keep")
        if name in self.recomputed:
            return Decision("recompute")
        raise KeyError(name)

    @property
    def quantized(self) -> dict[str, str]:
        return {name: fmt for name, fmt in self.saved.items() if fmt}


def evaluate(problem: Problem, saved: Mapping[str, str | None]) -> tuple[list[str], int, float]:
    """Check that ``saved`` lets the backward rebuild every required node; return the nodes it must
    recompute, the bytes held and the time added. Raises ``ValueError`` for an invalid set."""
    recomputed: list[str] = []
    for node in problem.reached(lambda node: node.name not in saved):
        if node.name in saved:
            continue
        if not node.can_recompute:
            raise ValueError(f"{node.name!r} is needed in the backward but is neither saved nor recomputable")
        recomputed.append(node.name)
    held = 0
    added = 0.0
    for name, fmt in saved.items():
        node = problem.by_name[name]
        if not node.can_save:
            raise ValueError(f"{name!r} cannot be saved")
        option = _option(node, fmt)
        held += option.stored_bytes if option else node.save_bytes
        added += option.added_s if option else 0.0
    added += sum(problem.by_name[name].recompute_s for name in recomputed)
    order = {n.name: i for i, n in enumerate(problem.nodes)}
    return sorted(recomputed, key=order.__getitem__), held, added


def _option(node: SolverNode, fmt: str | None) -> QuantOption | None:
    if fmt is None:
        return None
    for option in node.quant_options:
        if option.fmt == fmt:
            return option
    raise ValueError(f"{node.name!r} has no quantized option {fmt!r}")


def make_plan(
    problem: Problem, saved: Mapping[str, str | None], *, solver: str, solve_time_s: float, notes: Iterable[str] = ()
) -> Plan:
    recomputed, held, added = evaluate(problem, saved)
    feasible = problem.budget_bytes is None or held <= problem.budget_bytes + 1e-9
    if problem.max_added_s is not None and not math.isinf(problem.max_added_s):
        feasible = feasible and added <= problem.max_added_s * (1 + 1e-9)
    return Plan(
        saved=dict(saved),
        recomputed=recomputed,
        saved_bytes=held,
        added_s=added,
        feasible=feasible,
        solver=solver,
        solve_time_s=solve_time_s,
        notes=list(notes),
    )


def check_rebuildable(problem: Problem, needed: set[str]) -> None:
    """Every required node must be savable or recomputable from savable nodes; else no finite cut exists."""
    rebuildable: set[str] = set()
    for node in problem.nodes:
        if node.name in needed and (
            node.can_save or (node.can_recompute and all(i in rebuildable for i in node.inputs))
        ):
            rebuildable.add(node.name)
    stuck = [n.name for n in problem.nodes if n.required and n.name not in rebuildable]
    if stuck:
        raise ValueError(f"no plan exists: the backward needs {stuck[:5]}, which can be neither saved nor recomputed")


def format_tiers(formats: tuple[str, ...], bits: dict[str, int]) -> list[frozenset[str]]:
    """Admit formats widest first: {8-bit}, then {8, 4}, then {8, 4, 2}. Within a tier the price decides
    between recomputing and quantizing; a narrower tier is tried only when the wider cannot meet the budget."""
    widths = sorted({bits[f] for f in formats}, reverse=True) or [0]
    return [frozenset(f for f in formats if bits[f] >= width) for width in widths]
