"""Memory over one training step, fxmem's plan against torch.compile's default, for the timeline picture.

When every graph's report carries the simulator's timelines (``GraphReport.timeline`` and
``reference_timeline``: live bytes at each node of the forward, then of the backward, parameters
included; only ``fxmem.inspect`` simulates the reference), the curves are those. Otherwise they are a
liveness estimate from the report's rows, counting saved activations only: the forward produces the
candidate tensors in row order and holds what the plan stores; the backward reads them in reverse order
and frees each after its use. torch.compile's default holds the same tensors at full size, scaled so that
its total matches ``reference_saved_bytes``.

Graphs split by graph breaks run their forwards in order and their backwards in reverse order: each runs on
top of the other graphs' parameters and the tensors the earlier graphs saved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fxmem.report import GraphReport, TensorRow

Series = list[tuple[float, float]]  # (step, bytes)


@dataclass
class Timeline:
    fxmem: Series = field(default_factory=list)
    reference: Series = field(default_factory=list)
    backward_start: float | None = None  # the step where the backward begins (1.0: see _compose)
    budget_bytes: float | None = None  # where to draw the budget line, in the curves' terms
    budget_label: str = "budget"
    source: str = "estimate"  # "estimate": saved activations from the rows; "simulated": live memory

    @property
    def peak_bytes(self) -> float:
        return max((b for _, b in self.fxmem), default=0.0)

    @property
    def reference_peak_bytes(self) -> float:
        return max((b for _, b in self.reference), default=0.0)


@dataclass
class _Block:
    """One graph's curve: its forward and backward points, the bytes it holds throughout (its parameters)
    and the bytes its forward leaves for its backward."""

    forward: list[float]
    backward: list[float]
    static: float
    saved: float


def build_timeline(graphs: Sequence[GraphReport]) -> Timeline:
    fx_sim = [_simulated(g.timeline, g.predicted_saved_bytes) for g in graphs]
    ref_sim = [_simulated(g.reference_timeline, g.reference_saved_bytes) for g in graphs]
    if graphs and all(b is not None for b in fx_sim + ref_sim):
        timeline = Timeline(source="simulated")
        timeline.fxmem, timeline.backward_start = _compose(fx_sim)  # type: ignore[arg-type]
        timeline.reference, _ = _compose(ref_sim)  # type: ignore[arg-type]
        static = sum(b.static for b in fx_sim)  # type: ignore[union-attr]
        _budget_line(timeline, graphs, static)
        return timeline
    timeline = Timeline(source="estimate")
    timeline.fxmem, timeline.backward_start = _compose(
        [_estimated(g, _fxmem_weights(g), g.predicted_saved_bytes) for g in graphs]
    )
    if graphs and all(g.reference_saved_bytes is not None for g in graphs):
        timeline.reference, _ = _compose(
            [_estimated(g, _reference_weights(g), g.reference_saved_bytes) for g in graphs]
        )
    _budget_line(timeline, graphs, 0.0)
    return timeline


def _budget_line(timeline: Timeline, graphs: Sequence[GraphReport], static: float) -> None:
    """An absolute budget bounds the simulated peak; a fractional one bounds the saved activations, drawn on
    top of the parameters."""
    budgets = [g.budget_bytes for g in graphs]
    if not graphs or None in budgets:
        return
    absolute = all(isinstance(g.options.get("memory_budget"), int) for g in graphs)
    if timeline.source == "simulated" and absolute:
        timeline.budget_bytes = max(budgets)  # type: ignore[type-var]
        timeline.budget_label = "budget (peak)"
    else:
        timeline.budget_bytes = static + sum(budgets)  # type: ignore[arg-type]
        timeline.budget_label = "budget (parameters + saved)" if static else "budget (saved activations)"


def _simulated(value: Any, saved: int | None) -> _Block | None:
    """The simulator's timeline (``points`` of (phase, node, live bytes) and ``static_bytes``) as a block;
    also accepts a plain list of (phase, node, bytes) or (step, bytes)."""
    points = getattr(value, "points", value)
    if not points:
        return None
    forward: list[float] = []
    backward: list[float] = []
    for point in points:
        phase = point[0] if len(point) == 3 else "forward"
        (backward if phase == "backward" else forward).append(float(point[-1]))
    return _Block(forward, backward, float(getattr(value, "static_bytes", 0) or 0), float(saved or 0))


def _fxmem_weights(graph: GraphReport) -> list[float]:
    return [float(row.stored_bytes) if row.decision != "recompute" else 0.0 for row in graph.rows]


def _reference_weights(graph: GraphReport) -> list[float]:
    return [float(_full_bytes(row)) for row in graph.rows]


def _full_bytes(row: TensorRow) -> int:
    """What holding ``row`` unchanged would cost (nothing for parameters and buffers)."""
    alternatives = getattr(row, "alternatives", None) or {}
    if "keep" in alternatives:
        return alternatives["keep"][0]
    if row.decision == "keep":
        return row.stored_bytes
    return 0 if row.kind == "param" else row.bytes


def _estimated(graph: GraphReport, weights: list[float], total: int | None) -> _Block:
    """Saved bytes held after each row's tensor is made (forward) and freed (backward), scaled so that the
    forward ends holding ``total`` when it is known."""
    known = sum(weights)
    if total is not None and known > 0:
        weights = [w * total / known for w in weights]
    elif total:  # the rows say nothing: hold it all from the first step
        weights = [float(total), *weights]
    forward, held = [], 0.0
    for w in weights:
        held += w
        forward.append(held)
    backward = []
    for w in reversed(weights):
        held = max(held - w, 0.0)
        backward.append(held)
    return _Block(forward, backward, 0.0, forward[-1] if forward else 0.0)


def _compose(blocks: list[_Block]) -> tuple[Series, float | None]:
    """Forwards in graph order, then backwards in reverse order, each on top of the other graphs'
    parameters and of what the earlier graphs saved. Steps are scaled so that the forward spans [0, 1] and
    the backward [1, 2], which lines up plans whose graphs have different numbers of nodes."""
    if not blocks:
        return [], None
    static = sum(b.static for b in blocks)
    below = [0.0]
    for block in blocks[:-1]:
        below.append(below[-1] + block.saved)
    forward = [base + static - b.static + v for b, base in zip(blocks, below, strict=True) for v in b.forward]
    backward = [
        base + static - b.static + v
        for b, base in zip(reversed(blocks), reversed(below), strict=True)
        for v in b.backward
    ]
    series = [(0.0, static)]  # before the first node runs: the parameters
    series += [((i + 1) / len(forward), v) for i, v in enumerate(forward)]
    series += [(1.0 + (i + 1) / len(backward), v) for i, v in enumerate(backward)]
    return series, 1.0
